"""capsule audit throughput and memory on 10k and 100k stored rows (printed, not asserted).

Rows live in an Openfire-shaped stand-in table in the stack's MariaDB: 200 distinct real
capsules and 50 plaintext messages, repeated. The baseline is streaming the same rows without
auditing them, in the same run; memory is the Python heap peak (tracemalloc) while auditing.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from capsule import core, envelope
from capsule import stanza as st
from capsule.audit import Auditor, CertificateBundle, Report
from capsule.audit_sources import Dsn, sql_rows
from capsule.sql import literal
from tests.test_audit import OPENFIRE_SCHEMA
from tests.test_core import body


def _seed(stack, alice, bob) -> list[str]:
    data = alice.capsule.store.data
    me = alice.capsule.own_encrypt
    rows = []
    for i in range(200):
        env = envelope.encode(body(f"bench {i}"), alice.jid, [bob.jid], core.utc_timestamp())
        sealed = core.seal(env, sender=alice.jid, sender_cert=alice.capsule.own_sign.fingerprint,
                           signing_key=data.signing_key,
                           recipients=[core.Recipient(alice.jid, me.fingerprint, me.public_key)])
        msg = alice.client.make_message(mto=bob.jid, mtype="chat")
        msg["from"] = alice.jid
        st.from_core(msg, sealed)
        rows.append(str(msg))
    rows += [f"<message from='{bob.jid}' to='{alice.jid}' type='chat'><body>hi {i}</body></message>"
             for i in range(50)]
    return rows



@pytest.mark.parametrize("xmpp_stack", ["ejabberd"], indirect=True)
async def bench_audit_rows_per_second(xmpp_stack, capsule_bot) -> None:
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    seed = _seed(xmpp_stack, alice, bob)
    bundle = CertificateBundle()
    bundle.add_path(Path(xmpp_stack.info.ca_dir) / "newcerts")
    root = xmpp_stack.info.ca_root.read_bytes()
    for total in (10_000, 100_000):
        db = f"bench_audit_{total}"
        values = ", ".join(f"({i}, 1, 'a', NULL, 'b', NULL, {1795700000000 + i}, {literal(s)}, "
                           f"NULL, NULL)" for i, s in enumerate(seed))
        copies = " ".join(f"INSERT INTO ofMessageArchive SELECT messageID + {n}, conversationID, "
                          f"fromJID, fromJIDResource, toJID, toJIDResource, sentDate + {n}, stanza, "
                          f"body, isPMforJID FROM ofMessageArchive;" for n in _doublings(len(seed), total))
        xmpp_stack.sql(f"DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db};")
        xmpp_stack.sql(OPENFIRE_SCHEMA + f"INSERT INTO ofMessageArchive VALUES {values};" + copies
                       + f"DELETE FROM ofMessageArchive WHERE messageID >= {total};", db)
        dsn = Dsn.parse(xmpp_stack.dsn(db))
        began = time.perf_counter()
        streamed = sum(1 for _ in sql_rows("openfire", dsn))
        stream_rate = streamed / (time.perf_counter() - began)
        tracemalloc.start()
        began = time.perf_counter()
        report = Auditor(root, bundle).run(sql_rows("openfire", dsn), Report(["bench"]))
        elapsed = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        xmpp_stack.sql(f"DROP DATABASE {db}")
        assert report.rows == streamed == total
        print(f"\naudit {total} rows: {total / elapsed:.0f} rows/s (streaming alone "
              f"{stream_rate:.0f} rows/s, ratio {total / elapsed / stream_rate:.2f}); "
              f"Python heap peak {peak / 2**20:.1f} MiB; totals {report.totals()}")


def _doublings(start: int, total: int) -> list[int]:
    out, size = [], start
    while size < total:
        out.append(size)
        size *= 2
    return out
