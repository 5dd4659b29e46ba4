"""Received capsules per second with durable replay state (journal write + fsync before
delivery) vs the same receiver whose journal writes are faked away, same run.

Goal (issue 10): durable / in-memory >= 0.9. Each run is its own process with a fresh copy of
the receiver's profile in the bench's directory (a real disk); capsules go through the
plugin's stream filter as the stream would hand them over (no server: the server's share
would only dilute the difference). Median of several runs per mode, alternating; printed,
never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from capsule import core, envelope
from capsule import stanza as st
from capsule.testing.identities import enroll
from capsule_ca import Authority
from tests.helpers import rsa_key

COUNT = int(os.environ.get("CAPSULE_BENCH_MESSAGES", "600"))
RUNS = int(os.environ.get("CAPSULE_BENCH_RUNS", "5"))
PIN = "2468013579"

RECEIVER = """
import asyncio, json, sys, time
from slixmpp import ClientXMPP
from slixmpp.xmlstream import ET
from capsule import journal
from capsule.plugin import attach
from capsule.trust import CertPair, CertificateSource

profile, capsules, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "in-memory":  # a fake: the journal write and fsync skipped, all else the same
    journal.Journal.append = lambda self, entries: None
data = json.loads(open(capsules).read())

class Static(CertificateSource):
    async def fetch(self, jid):
        return CertPair(data["sign"].encode(), data["encrypt"].encode())

async def main():
    client = ClientXMPP(data["to"], "unused")
    attach(client, profile, data["pin"], allow_insecure=True, publish=False, source=Static())
    plugin = client.plugin["capsule"]
    done = asyncio.Event()
    count = 0
    def got(_msg):
        nonlocal count
        count += 1
        if count == len(data["stanzas"]):
            done.set()
    client.add_event_handler("capsule_message", got)
    stanzas = [client._build_stanza(ET.fromstring(raw)) for raw in data["stanzas"]]
    await plugin.contact(data["from"])  # certificates pinned before the clock starts
    began = time.perf_counter()
    for stanza in stanzas:
        plugin._filter_in(stanza)
        await asyncio.sleep(0)
    await asyncio.wait_for(done.wait(), 600)
    print(len(stanzas) / (time.perf_counter() - began))

asyncio.run(main())
"""


def _capsules(tmp: Path) -> tuple[Path, Path]:
    ca = Authority.init(tmp / "ca", "Bench CA", b"bench passphrase")
    alice = enroll(ca, tmp / "alice.capsule", "alice@capsule.test", PIN)
    bob = enroll(ca, tmp / "bob.capsule", "bob@capsule.test", PIN)
    assert alice.data.signing_cert and alice.data.encryption_cert and bob.data.encryption_cert
    from cryptography import x509
    from slixmpp import Message
    from slixmpp.xmlstream import ET

    st.register()
    bob_enc = x509.load_pem_x509_certificate(bob.data.encryption_cert.encode())
    alice_sign = x509.load_pem_x509_certificate(alice.data.signing_cert.encode())
    recipient = core.Recipient(bob.data.jid, core.cert_fingerprint(bob_enc),
                               rsa_key(bob_enc))
    stanzas = []
    for i in range(COUNT):
        body = ET.Element("{jabber:client}body")
        body.text = f"message {i}"
        env = envelope.encode([body], alice.data.jid, [bob.data.jid], core.utc_timestamp())
        capsule = core.seal(env, sender=alice.data.jid,
                            sender_cert=core.cert_fingerprint(alice_sign),
                            signing_key=alice.data.signing_key, recipients=[recipient])
        msg = Message()
        msg["to"], msg["from"], msg["type"], msg["id"] = (bob.data.jid,
                                                          f"{alice.data.jid}/bench", "chat",
                                                          f"m{i}")
        st.from_core(msg, capsule)
        stanzas.append(str(msg))
    data = {"to": bob.data.jid, "from": alice.data.jid, "pin": PIN, "stanzas": stanzas,
            "sign": alice.data.signing_cert, "encrypt": alice.data.encryption_cert}
    path = tmp / "capsules.json"
    path.write_text(json.dumps(data))
    return bob.path, path


def _run(profile: Path, capsules: Path, mode: str, run: int) -> float:
    copy = profile.with_name(f"run-{mode}-{run}.capsule")
    shutil.copyfile(profile, copy)
    out = subprocess.run([sys.executable, "-c", RECEIVER, str(copy), str(capsules), mode],
                         capture_output=True, text=True, check=True, timeout=900)
    return float(out.stdout.split()[-1])


def bench_durable_replay_state_vs_in_memory(tmp_path: Path) -> None:
    work = Path(os.environ.get("CAPSULE_BENCH_DIR", tmp_path))
    profile, capsules = _capsules(work)
    rates: dict[str, list[float]] = {"durable": [], "in-memory": []}
    for run in range(RUNS):
        for mode in rates:
            rates[mode].append(_run(profile, capsules, mode, run))
    durable, memory = (statistics.median(rates[m]) for m in ("durable", "in-memory"))
    print(f"\n{COUNT} capsules received, median of {RUNS} runs on {work}: durable "
          f"{durable:.0f} msg/s, in-memory {memory:.0f} msg/s, ratio {durable / memory:.2f} "
          f"(goal >= 0.9); runs: {rates}")
