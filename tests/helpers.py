"""What several test modules share (no test module imports another): PINs, the canonical wire
example, stored-row tampering, the receiver bot in its own process, the delivery ledger."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import os
import random
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from slixmpp import ClientXMPP, Message
from slixmpp.basexmpp import BaseXMPP
from slixmpp.plugins.base import PluginManager

from capsule import XEP_Capsule, capsule_info, core, envelope, v1
from capsule import stanza as st
from capsule.profile import Profile
from capsule.testing.leaks import Plaintexts
from capsule_stack.cluster import ClusterStack, open_stack
from capsule_stack.fixtures import BOT_PIN, Account
from capsule_stack.processes import pid_alive
from capsule_stack.stack import Stack

__all__ = ["BOT_PIN", "CAPSULE", "OPENFIRE_ARCHIVE", "OPENFIRE_OFFLINE", "PIN", "RECEIVER", "WIRE",
           "Ledger", "Receiver", "body", "capsule_of", "rng", "rsa_key", "settle", "tamper",
           "verified_sender"]

PIN = "246810"  # unit-test profiles (tests/conftest.py)
# every plaintext the bot-to-bot tests send: fixture no_plaintext_in_debug_log looks for them
secret = Plaintexts()
ROOT = Path(__file__).resolve().parents[1]  # the checkout
VECTORS = Path(__file__).parent / "data" / "v1-vectors.json"  # wire format v1 test vectors
# Openfire's two stored-message tables, from its documented columns (a stand-in for its schema)
OPENFIRE_ARCHIVE = """
CREATE TABLE ofMessageArchive (messageID BIGINT NULL, conversationID BIGINT NOT NULL,
  fromJID VARCHAR(1024) NOT NULL, fromJIDResource VARCHAR(1024) NULL,
  toJID VARCHAR(1024) NOT NULL, toJIDResource VARCHAR(1024) NULL, sentDate BIGINT NOT NULL,
  stanza TEXT NULL, body TEXT NULL, isPMforJID VARCHAR(1024) NULL);
"""
OPENFIRE_OFFLINE = """
CREATE TABLE ofOffline (username VARCHAR(64) NOT NULL, messageID BIGINT NOT NULL,
  creationDate CHAR(15) NOT NULL, messageSize INTEGER NOT NULL, stanza TEXT NOT NULL,
  PRIMARY KEY (username, messageID));
"""


def body(text: str) -> list[ET.Element]:
    el = ET.Element("{jabber:client}body")
    el.text = text
    return [el]


def capsule_of(client: BaseXMPP) -> XEP_Capsule:
    """A client's Capsule plugin: slixmpp types ``client.plugin`` as a TypedDict of its own plugins only
    (at run time it is a PluginManager)."""
    plugin = cast(PluginManager, client.plugin)["capsule"]
    assert isinstance(plugin, XEP_Capsule), plugin
    return plugin


def verified_sender(msg: Message) -> str:
    """The sender named by the verified capsule ``msg`` arrived in (the test fails otherwise)."""
    info = capsule_info(msg)
    assert info is not None, f"message {msg['id']!r} did not arrive as a verified capsule"
    return info.sender


def rsa_key(cert: x509.Certificate) -> rsa.RSAPublicKey:
    """A certificate's public key, which for every certificate of Capsule's CA is RSA."""
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey), type(key)
    return key


B = base64.b64encode
CAPSULE = core.Capsule(
    header=core.Header(
        sender="alice@example.org", cert="aa" * 32, nid=b"\x01" * 16, ts="2026-11-26T10:00:00Z",
        keys=(core.KeyEntry("alice@example.org", "cc" * 32, b"wrapped-a"),
              core.KeyEntry("bob@example.org", "bb" * 32, b"wrapped-b")),
        iv=b"\x02" * 12,
    ),
    payload=b"ciphertext-and-tag",
    signature=b"signature",
)

NID, IV = B(b"\x01" * 16).decode(), B(b"\x02" * 12).decode()
WIRE = f"""
<message to="bob@example.org" type="chat">
  <capsule xmlns="urn:capsule:0">
    <header sender="alice@example.org" cert="{'aa' * 32}" nid="{NID}"
            ts="2026-11-26T10:00:00Z">
      <key jid="alice@example.org" cert="{'cc' * 32}">{B(b'wrapped-a').decode()}</key>
      <key jid="bob@example.org" cert="{'bb' * 32}">{B(b'wrapped-b').decode()}</key>
      <iv>{IV}</iv>
    </header>
    <payload>{B(b'ciphertext-and-tag').decode()}</payload>
    <signature>{B(b'signature').decode()}</signature>
  </capsule>
  <body>{st.FALLBACK_BODY}</body>
  <encryption xmlns="urn:xmpp:eme:0" namespace="urn:capsule:0" name="Capsule"/>
  <store xmlns="urn:xmpp:hints"/>
</message>
"""


def tamper(part: str, row: str) -> tuple[str, str]:
    """A (old, new) pair flipping one base64 character inside ``part`` of a stored capsule."""
    patterns = {
        "payload": r"<payload>([A-Za-z0-9+/=]+)</payload>",
        "signature": r"<signature>([A-Za-z0-9+/=]+)</signature>",
        "wrapped key": r"<key [^>]*>([A-Za-z0-9+/=]+)</key>",
        "header": r"\bnid=.([A-Za-z0-9+/=]+)",
    }
    old = re.search(patterns[part], row)
    assert old, f"no {part} in stored row"
    value = old.group(1)
    swap = "B" if value[10] != "B" else "C"
    return value, value[:10] + swap + value[11:]


RECEIVER = Path(__file__).with_name("receiver_bot.py")


class Receiver:
    """tests/receiver_bot.py in its own process; its event lines collected as they come."""

    def __init__(self, lines: list[list[str]]) -> None:
        self.lines = lines
        self.raw: list[bytes] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self, stack: Stack, account: Account, profile: Path) -> None:
        env = {**os.environ, "BOT_PASSWORD": account.password, "CAPSULE_PIN": BOT_PIN}
        self._ready = asyncio.Event()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(RECEIVER), account.jid, str(stack.info.c2s_port),
            str(stack.info.ca_root), str(profile), env=env, stdout=subprocess.PIPE)
        self._reader = asyncio.ensure_future(self._read())
        await asyncio.wait_for(self._ready.wait(), 60)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.raw.append(raw)
            words = raw.decode().split()
            if words == ["ready"]:
                self._ready.set()
            elif words:
                self.lines.append(words)

    async def kill(self) -> None:
        assert self.proc is not None and self._reader is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        await self._reader


SEED = int(os.environ.get("CAPSULE_DELIVERY_SEED", random.randrange(1 << 30)))


def rng(test: str) -> random.Random:
    print(f"{test}: CAPSULE_DELIVERY_SEED={SEED}")
    return random.Random(f"{SEED} {test}")


class Ledger:
    """What the sender was told (acked, delivered, undelivered) and what the receiving app got."""

    def __init__(self, sender: ClientXMPP, receiver: ClientXMPP | None = None):
        self.delivered: collections.Counter[str] = collections.Counter()
        self.acked: set[str] = set()
        self.confirmed: set[str] = set()
        self.undelivered: dict[str, str] = {}
        self.errors: list[Any] = []
        sender.add_event_handler("capsule_acked", lambda a: self.acked.add(a.stanza_id))
        sender.add_event_handler("capsule_delivered", lambda d: self.confirmed.add(d.stanza_id))
        sender.add_event_handler("capsule_undelivered",
                                 lambda f: self.undelivered.__setitem__(f.stanza_id, f.message))
        if receiver is not None:
            receiver.add_event_handler("message", lambda m: self.delivered.update([m["body"]]))
            receiver.add_event_handler("capsule_error", self.errors.append)

    def settled(self, sent: dict[str, str]) -> bool:
        """Every capsule confirmed by the contact's receipt or reported undelivered."""
        return all(sid in self.undelivered or sid in self.confirmed for sid in sent)

    def check(self, sent: dict[str, str]) -> None:
        """Exactly once or reported; a receipt only for what the app got."""
        twice = {body: n for body, n in self.delivered.items() if n > 1}
        assert not twice, f"delivered more than once: {twice}"
        lost = [body for sid, body in sent.items()
                if not self.delivered[body] and sid not in self.undelivered]
        assert not lost, (f"{len(lost)} of {len(sent)} lost silently, e.g. {lost[:3]}; "
                          f"errors {self.errors[:3]}")
        assert set(self.delivered) <= set(sent.values())
        lying = [sid for sid in self.confirmed if not self.delivered[sent[sid]]]
        assert not lying, f"receipts for capsules the app never got: {lying[:3]}"
        # resent copies are dropped quietly, not errors; a certificate look-up that timed out
        # while the server was down is an honest refusal (the resend is delivered: `lost` above)
        assert not [e for e in self.errors if e.reason != "lookup-failed"], self.errors


async def settle(ledger: Ledger, sent: dict[str, str], timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ledger.settled(sent) and loop.time() < deadline:
        await asyncio.sleep(0.1)


def assert_ciphertext_only(stack: Stack, user: str, texts: list[str], store: str = "archive"
                           ) -> list[str]:
    """What ``user``'s ``store`` holds, none of it any of ``texts``."""
    rows = stack.stored(store, user)
    assert rows, f"nothing in {store} for {user}"
    for text in texts:
        assert not any(text in row for row in rows), f"plaintext {text!r} stored in {store}"
    return rows


def seal_v1(alice: Profile, bob: Profile, now: int, text: str = "the archive must not give this away"
            ) -> v1.Capsule:
    """A v1 capsule from alice to bob's newest session key and her own (both need one)."""
    el = ET.Element("{jabber:client}body")
    el.text = text
    env = envelope.encode([el], alice.data.jid, [bob.data.jid], core.utc_timestamp())
    assert alice.data.signing_cert
    fp = core.cert_fingerprint(x509.load_pem_x509_certificate(alice.data.signing_cert.encode()))
    return v1.seal(env, sender=alice.data.jid, sender_cert=fp, signing_key=alice.data.signing_key,
                   recipients=[v1.Recipient(p.data.jid, p.current_sessions(now)[0].pub)
                               for p in (alice, bob)])


_HOLDER = """
import os, sys, time
from capsule.profile import Profile
p = Profile.load(sys.argv[1], os.environ["CAPSULE_PIN"])
p.hold()
print("holding", flush=True)
time.sleep(60)
"""


def hold_in_another_process(path: Path, pin: str) -> subprocess.Popen[bytes]:
    """A process that opened ``path`` and holds it (a running bot), until killed."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE,
                              env={**os.environ, "CAPSULE_PIN": pin})
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"holding"
    return holder


def stack_command(*args: object) -> subprocess.CompletedProcess[str]:
    """`scripts/stack ARGS` as a user types it (without the developer's CAPSULE_* settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
    proc = subprocess.run([str(ROOT / "scripts/stack"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@contextlib.contextmanager
def running_cluster(directory: Path) -> Iterator[ClusterStack]:
    """A two-node cluster started and, at the end, stopped with `scripts/stack`."""
    servers = os.environ.get("CAPSULE_SERVERS", "ejabberd")
    if "ejabberd" not in servers.split(","):
        pytest.skip(f"the cluster is ejabberd's; CAPSULE_SERVERS={servers} leaves it out")
    started = stack_command("start", "--nodes", 2, "--dir", directory)
    assert started.returncode == 0, started.stderr
    stack = open_stack(directory)
    assert isinstance(stack, ClusterStack)
    try:
        yield stack
    finally:
        pids = dict(open_stack(directory).info.pids)  # as the last start/restart left them
        stopped = stack_command("stop", "--dir", directory)
        assert stopped.returncode == 0, stopped.stderr
        # stop ends every node and MariaDB: no recorded process left
        assert not [name for name, pid in pids.items() if pid_alive(pid, str(directory))]
