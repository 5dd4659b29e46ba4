"""capsule audit throughput and memory on 10k and 100k stored rows (printed, not asserted).

Goal (issue 16): >= 20,000 rows/s on 100k rows with flat memory. Rows live in an
Openfire-shaped stand-in table in the stack's MariaDB: 200 distinct real capsules (half v0,
half v1) and 50 plaintext messages, copied until the table is full; every row has its own
message id and time, so no two rows hold the same text (the same capsule recurs, as it does
across archives and offline queues). Each program runs as a process, as an auditor runs it
(start-up and report included), interleaved, median of ``CAPSULE_BENCH_REPEATS`` rounds: the
bare driver (``driver_stream.py``: PyMySQL's server-side cursor over the audit's own query,
rows fetched and dropped), ``capsule audit --jobs 1`` and ``capsule audit`` with its default
jobs; wall-clock rows/s, rows per CPU-second (all its processes) and peak memory (PSS of all
its processes; flat: the same at 10k and 100k rows). ``CAPSULE_BENCH_PROFILE=1`` prints where
one process spends an audit's time (cProfile).
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from capsule import core, envelope, v1, wire
from capsule.audit.findings import Report
from capsule.audit.sources import AUDIT_DSN_ENV, Dsn, sql_rows
from capsule.audit.verdicts import Auditor, CertificateBundle
from capsule.cli.audit import DEFAULT_JOBS
from capsule_stack.sql import literal
from tests.helpers import OPENFIRE_ARCHIVE, body, seal_v1

REPEATS = int(os.environ.get("CAPSULE_BENCH_REPEATS", "3"))
DRIVER = Path(__file__).with_name("driver_stream.py")
MINUTE_MS = 60_000


def _seed(alice, bob) -> list[str]:
    """100 v0 and 100 v1 capsules from alice to bob (an archive from before and after wire
    format v1), 50 plaintext messages."""
    data = alice.capsule.store.data
    to = bob.capsule.own_encrypt  # keyed for the stored addressee, or recipient-mismatch
    now = int(time.time())
    rows = []
    for i in range(200):
        capsule: core.Capsule | v1.Capsule
        if i % 2:
            capsule = seal_v1(alice.capsule.store, bob.capsule.store, now, f"bench {i}")
        else:
            env = envelope.encode(body(f"bench {i}"), alice.jid, [bob.jid], core.utc_timestamp())
            capsule = core.seal(env, sender=alice.jid, sender_cert=alice.capsule.own_sign.fingerprint,
                                signing_key=data.signing_key,
                                recipients=[core.Recipient(bob.jid, to.fingerprint, to.public_key)])
        msg = alice.client.make_message(mto=bob.jid, mtype="chat")
        msg["from"] = alice.jid
        msg["id"] = "SEEDID"
        wire.put(msg, capsule)
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


@pytest.mark.parametrize("xmpp_stack", ["ejabberd"], indirect=True)
async def bench_audit_rows_per_second(xmpp_stack, capsule_bot, tmp_path) -> None:
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    seed = _seed(alice, bob)
    certs = Path(xmpp_stack.info.ca_dir) / "newcerts"
    for total in (10_000, 100_000):
        db = f"bench_audit_{total}"
        _fill(xmpp_stack, db, seed, total)
        _measure(xmpp_stack, db, certs, total, tmp_path)
        if os.environ.get("CAPSULE_BENCH_PROFILE") and total == 100_000:
            _profile(Dsn.parse(xmpp_stack.dsn(db)), xmpp_stack.info.ca_root.read_bytes(), certs)
        xmpp_stack.sql(f"DROP DATABASE {db}")


@dataclass(frozen=True)
class Run:
    rows_per_s: float
    cpu_s: float  # user + system of the process and the workers it waited for
    peak_kib: int  # the most its processes held at once (PSS, sampled)


def _tree_pss_kib(pid: int) -> int:
    """Memory of a process and its children now, as PSS: pages that forked workers share
    with their parent count once, split among them, not once per process (0 once gone)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0
    pss = next((int(line.split()[1]) for line in rollup.splitlines()
                if line.startswith("Pss:")), 0)
    return pss + sum(_tree_pss_kib(int(child)) for child in children)


def _run(argv: list[str], env: dict[str, str], total: int, errors: Path) -> Run:
    """One program's run: its rusage covers the workers it waited for, but its maxrss would
    count the pytest process it was forked from, so memory is sampled from /proc instead."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began, peak = time.perf_counter(), 0
    with errors.open("wb") as stderr:
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        while process.poll() is None:
            peak = max(peak, _tree_pss_kib(process.pid))
            time.sleep(0.02)
    wall = time.perf_counter() - began
    assert process.returncode == 0, errors.read_text()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(total / wall, cpu, peak)


def _measure(stack, db: str, certs: Path, total: int, tmp_path: Path) -> None:
    """Three programs, interleaved so that other load weighs on all alike: the bare driver,
    `capsule audit --jobs 1` and `capsule audit` as an auditor runs it (its default jobs)."""
    env = {**os.environ, AUDIT_DSN_ENV: stack.dsn(db),
           "CAPSULE_AUDIT_DB_PASSWORD": stack.info.db_password}
    capsule = str(Path(sys.executable).with_name("capsule"))
    audit = [capsule, "audit", "--source", "openfire", "--ca", str(stack.info.ca_root),
             "--certs", str(certs), "--json", str(tmp_path / "report.json")]
    programs = {"bare driver": [sys.executable, str(DRIVER), "openfire"],
                "audit --jobs 1": [*audit, "--jobs", "1"],
                f"audit (default --jobs {DEFAULT_JOBS})": audit}
    runs = {name: [] for name in programs}  # type: dict[str, list[Run]]
    for _ in range(REPEATS):
        for name, argv in programs.items():
            runs[name].append(_run(argv, env, total, tmp_path / "stderr"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows"] == total and report["totals"]["capsule"] == 200, report["totals"]
    driver = statistics.median(r.rows_per_s for r in runs["bare driver"])
    print(f"\n{total} Openfire-shaped rows, each program a process (median of {REPEATS}):")
    for name, done in runs.items():
        rate = statistics.median(r.rows_per_s for r in done)
        print(f"  {name}: {rate:.0f} rows/s wall (goal 20000; {rate / driver:.2f} of the driver), "
              f"{total / statistics.median(r.cpu_s for r in done):.0f} rows per CPU-second, "
              f"peak memory {max(r.peak_kib for r in done) / 1024:.0f} MiB (PSS, all its processes)")


def _profile(dsn: Dsn, root: bytes, certs: Path) -> None:
    """Where one process spends an audit's time (cProfile, in this process)."""
    bundle = CertificateBundle()
    bundle.add_path(certs)
    gc.freeze()  # as `capsule audit` does before it reads the rows
    profile = cProfile.Profile()
    profile.runcall(lambda: Auditor(root, bundle).run(sql_rows("openfire", dsn, lambda *_: None),
                                                      Report(["b"])))
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)
