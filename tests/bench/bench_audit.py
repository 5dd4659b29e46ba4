"""capsule audit throughput and memory on 10k and 100k stored rows (printed, not asserted).

Goal (issue 16): >= 20,000 rows/s on 100k rows with flat memory. Rows live in an Openfire-shaped
stand-in table in the stack's MariaDB: 200 distinct real capsules and 50 plaintext messages,
copied until the table is full; every row has its own message id and time, so no two rows hold
the same text (the same capsule recurs, as it does across archives and offline queues). Same
run, interleaved, median of ``CAPSULE_BENCH_REPEATS`` rounds: the bare driver (PyMySQL's
server-side cursor, rows fetched and dropped), Capsule's row source, and the full audit. Memory is the
Python heap peak (tracemalloc) of one more audit run, which tracemalloc slows down.
``CAPSULE_BENCH_PROFILE=1`` prints where an audit run spends its time (cProfile).
"""

from __future__ import annotations

import cProfile
import gc
import os
import pstats
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from capsule import core, envelope
from capsule import stanza as st
from capsule.audit.findings import Report
from capsule.audit.sources import SQL_SOURCES, Dsn, sql_rows
from capsule.audit.verdicts import Auditor, CertificateBundle
from capsule_stack.sql import literal
from tests.helpers import OPENFIRE_ARCHIVE, body

REPEATS = int(os.environ.get("CAPSULE_BENCH_REPEATS", "3"))
MINUTE_MS = 60_000


def _seed(alice, bob) -> list[str]:
    data = alice.capsule.store.data
    to = bob.capsule.own_encrypt  # keyed for the stored addressee, or recipient-mismatch
    rows = []
    for i in range(200):
        env = envelope.encode(body(f"bench {i}"), alice.jid, [bob.jid], core.utc_timestamp())
        sealed = core.seal(env, sender=alice.jid, sender_cert=alice.capsule.own_sign.fingerprint,
                           signing_key=data.signing_key,
                           recipients=[core.Recipient(bob.jid, to.fingerprint, to.public_key)])
        msg = alice.client.make_message(mto=bob.jid, mtype="chat")
        msg["from"] = alice.jid
        msg["id"] = "SEEDID"
        st.from_core(msg, sealed)
        rows.append(str(msg))
    rows += [f"<message id='SEEDID' from='{bob.jid}' to='{alice.jid}' type='chat'>"
             f"<body>hi {i}</body></message>" for i in range(50)]
    return rows


def _fill(stack, db: str, seed: list[str], total: int) -> None:
    """Copies of the seed rows, each with its own id and minute, built inside MariaDB from a
    seed table and its sequence engine (no temporary tables, no 100 MB of SQL text)."""
    values = ", ".join(f"({i}, {literal(s)})" for i, s in enumerate(seed))
    copies = -(-total // len(seed))
    stack.sql(f"DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db};")
    stack.sql(OPENFIRE_ARCHIVE + "CREATE TABLE seed (n INT, stanza TEXT);"
              f"INSERT INTO seed VALUES {values};"
              "INSERT INTO ofMessageArchive SELECT id, 1, 'a', NULL, 'b', NULL, "
              f"1795700000000 + id * {MINUTE_MS}, REPLACE(stanza, 'SEEDID', CONCAT('m', id)), "
              f"NULL, NULL FROM (SELECT seq * {len(seed)} + n AS id, stanza FROM seed "
              f"JOIN seq_0_to_{copies - 1}) AS copy WHERE id < {total};", db)


def _rate(total: int, run: Callable[[], int]) -> tuple[float, float]:
    """Rows per second of wall time, and per second of this process's CPU time (which other
    load on a shared machine disturbs far less)."""
    began, cpu = time.perf_counter(), time.process_time()
    assert run() == total
    return total / (time.perf_counter() - began), total / (time.process_time() - cpu)


@pytest.mark.parametrize("xmpp_stack", ["ejabberd"], indirect=True)
async def bench_audit_rows_per_second(xmpp_stack, capsule_bot) -> None:
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    seed = _seed(alice, bob)
    bundle = CertificateBundle()
    bundle.add_path(Path(xmpp_stack.info.ca_dir) / "newcerts")
    root = xmpp_stack.info.ca_root.read_bytes()
    for total in (10_000, 100_000):
        db = f"bench_audit_{total}"
        _fill(xmpp_stack, db, seed, total)
        _measure(Dsn.parse(xmpp_stack.dsn(db)), root, bundle, total)
        xmpp_stack.sql(f"DROP DATABASE {db}")


def _measure(dsn: Dsn, root: bytes, bundle: CertificateBundle, total: int) -> None:
    def driver() -> int:
        with dsn.connect() as connection, connection.cursor() as cursor:
            cursor.execute(SQL_SOURCES["openfire"][0].sql)
            return sum(len(rows) for rows in iter(lambda: cursor.fetchmany(500), ()))

    def source() -> int:
        return sum(1 for _ in sql_rows("openfire", dsn, lambda *_: None))

    def audit() -> int:
        gc.freeze()  # as `capsule audit` does before it reads the rows
        report = Auditor(root, bundle).run(sql_rows("openfire", dsn, lambda *_: None),
                                           Report(["bench"]))
        assert report.totals()["capsule"] == 200 and not report.totals()["malformed"]
        return report.rows

    # interleaved, so that other load on the machine weighs on all three alike
    runs = [[_rate(total, f) for f in (driver, source, audit)] for _ in range(REPEATS)]
    tracemalloc.start()
    audit()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    for clock, i in (("wall", 0), ("CPU", 1)):
        bare, rows, audited = (statistics.median(c[i] for c in column)
                               for column in zip(*runs, strict=True))
        ratio = statistics.median(r[2][i] / r[0][i] for r in runs)
        print(f"\naudit {total} rows, {clock} time: {audited:.0f} rows/s (goal 20000); bare "
              f"driver stream {bare:.0f} rows/s (audit/driver {ratio:.2f}); Capsule's row "
              f"source {rows:.0f} rows/s (median of {REPEATS})")
    print(f"Python heap peak while auditing {total} rows: {peak / 2**20:.1f} MiB")
    if os.environ.get("CAPSULE_BENCH_PROFILE") and total == 100_000:
        profile = cProfile.Profile()
        profile.runcall(audit)
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
