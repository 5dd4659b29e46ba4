"""Many bots per process, plaintext against Capsule in the same run (issue 15).

Layout 1: one process of N bots on one server node, every bot sending to the next. Layout 2:
two processes of N bots each on the two nodes of an ejabberd cluster, every bot sending to
its partner on the other node. Every fleet, plaintext or Capsule, runs in processes of its
own (scale_bots.py), on the same accounts. Per N: RSS per bot once logged in and warmed up,
time to log all in (concurrently; Capsule bots restarting with the profile they kept),
messages per second (CAPSULE_BENCH_RUNS exchanges of CAPSULE_BENCH_EXCHANGE messages in all,
default 1,000, every bot sending its share at once to its partner, after a warm-up capsule per
pair: the same burst at every size, so that only the number of bots differs), the fleet
processes' CPU time per message and the garbage collector's part of it, encrypted / plaintext, and
the first login of the bots new at this size, plaintext then Capsule (certificates
published). Plaintext and Capsule fleets take turns, CAPSULE_BENCH_ROUNDS times each (ABBA):
medians over the rounds, the lowest and highest exchange and round ratio shown. The
profiles use the light Argon2id parameters of the tests (8 MiB, 1 iteration).
Sizes: CAPSULE_BENCH_BOTS (default 50,100,200,500). Printed, never asserted.

CAPSULE_BENCH_GC_FREEZE=1: every fleet process calls gc.freeze() once logged in.
CAPSULE_BENCH_GC=off: every fleet process calls gc.disable() once logged in (nothing the bots
make is cyclic: every collection in our runs freed nothing), to tell the collector's share of
a fall in the ratio from the bots' own work.
CAPSULE_BENCH_ROOMS=0: the Capsule bots run with the plugin option rooms=False.

A third bench logs in CAPSULE_BENCH_UNLOCK_BOTS (default 50) bots whose profiles have the
default Argon2id parameters (64 MiB, 3 iterations, 4 lanes): plaintext, each profile with a
salt of its own, and all sharing one (``--share-unlock-with``), in turns.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scale_bots import PIN  # beside this file (tests/bench is on sys.path)
from slixmpp import JID

from capsule.profile import FAST_KDF, KdfParams
from capsule.testing.identities import enroll
from capsule_ca import Authority
from capsule_stack.cluster import ClusterStack
from capsule_stack.stack import Stack
from capsule_stack.state import DEFAULT_DOMAIN

SIZES = [int(n) for n in os.environ.get("CAPSULE_BENCH_BOTS", "50,100,200,500").split(",")]
EXCHANGE = int(os.environ.get("CAPSULE_BENCH_EXCHANGE", "1000"))
RUNS = int(os.environ.get("CAPSULE_BENCH_RUNS", "2"))
ROUNDS = int(os.environ.get("CAPSULE_BENCH_ROUNDS", "3"))
UNLOCK_BOTS = int(os.environ.get("CAPSULE_BENCH_UNLOCK_BOTS", "50"))
PAUSE = 3  # seconds between fleets: the server finishes the last one's archive writes
WORKER = Path(__file__).with_name("scale_bots.py")
CA_PASSPHRASE = b"bench CA passphrase"
HEADER = ("| layout | bots per process | RSS per bot, plaintext / Capsule "
          "| log in all, plaintext / Capsule | first log in of the new bots, plaintext / Capsule "
          "| msg/s, plaintext / Capsule (lowest..highest run) | ratio (lowest..highest round) "
          "| CPU per message, plaintext / Capsule (of it the collector) |")


class Profiles:
    """Enrolled profile templates shared by both layouts (each pool copies them once), all
    certified by one throwaway CA, so that any two of them trust each other whichever stack
    their accounts are on (every stack serves the same domain). Made in parallel processes:
    a profile's RSA key generation and its certificates cost ≈ 0.2 s, 1,000 of them minutes."""

    def __init__(self, directory: Path, kdf: KdfParams = FAST_KDF, shared: bool = False):
        self.directory = directory
        self.ca_dir = directory / "ca"
        Authority.init(self.ca_dir, "Bench CA", CA_PASSPHRASE)
        self.bots: list[tuple[str, str, Path]] = []  # jid, password, profile template
        self.kdf, self.shared = kdf, shared  # shared: every profile takes the first's unlock

    def grow(self, n: int) -> None:
        new = [(f"bot{i}-{secrets.token_hex(3)}@{DEFAULT_DOMAIN}", secrets.token_hex(8),
                self.directory / f"bot{i}.capsule") for i in range(len(self.bots), n)]
        share = None
        if new and self.shared:
            share = (self.bots or new)[0][2]
            if not self.bots:  # the first is made here; the others share its unlock
                _open_ca(self.ca_dir)
                _enroll((new[0][0], share, self.kdf, None))
                self.bots, new = new[:1], new[1:]
        if new:
            with ProcessPoolExecutor(os.cpu_count(), initializer=_open_ca,
                                     initargs=(self.ca_dir,)) as workers:
                list(workers.map(_enroll, [(jid, path, self.kdf, share)
                                           for jid, _pw, path in new], chunksize=8))
            self.bots += new


_ca: Authority | None = None  # a worker process's own handle on the bench CA


def _open_ca(ca_dir: Path) -> None:
    global _ca
    _ca = Authority(ca_dir, CA_PASSPHRASE)


def _enroll(job: tuple[str, Path, KdfParams, Path | None]) -> None:
    assert _ca is not None
    jid, path, kdf, share = job
    enroll(_ca, path, jid, PIN, kdf, share_unlock_with=share)  # the CA's lock serialises its part


@dataclass
class Pool:
    """The first ``accounts`` bots of ``profiles`` with accounts on ``stack``, and each bot's
    own profile in ``home``: a bot keeps it from one run to the next, as a restarted bot does.
    (A fresh copy of the template per run made every run a new device of the account: its
    session record from the run before stayed on PEP, valid for two days, and every capsule
    was sealed to it too, so the first bots cost more to reach at each larger size.)"""

    stack: Stack
    profiles: Profiles
    home: Path
    accounts: int = 0
    logged_in: set[str] = field(default_factory=set)  # Capsule bots logged in once

    def grow(self, n: int) -> list[tuple[str, str, Path]]:
        """The first ``n`` bots, enrolled and with accounts (made a few at a time)."""
        self.profiles.grow(n)
        bots = self.profiles.bots[:n]
        with ThreadPoolExecutor(4) as workers:
            list(workers.map(lambda bot: self.stack.adduser(JID(bot[0]).user, bot[1]),
                             bots[self.accounts:]))
        self.accounts = max(self.accounts, n)
        return bots

    def profiles_of(self, bots: list[tuple[str, str, Path]]) -> list[str]:
        """Each bot's profile, made from its template on first use."""
        self.home.mkdir(parents=True, exist_ok=True)
        return [str(mine if (mine := self.home / template.name).exists()
                    else shutil.copy(template, mine)) for _j, _p, template in bots]


Spec = list[tuple[list[tuple[str, str, str | None, str]], int]]  # per process: bots, port


def _row(layout: str, n: int, plain: dict[str, float], enc: dict[str, float],
         first: dict[str, float]) -> str:
    return (f"| {layout} | {n} | {plain['rss']:.0f} / {enc['rss']:.0f} KiB | "
            f"{plain['login']:.1f} / {enc['login']:.1f} s ({enc['login'] / plain['login']:.2f}x) | "
            f"{_first(first)} | {plain['rate']:.0f} / {enc['rate']:.0f} "
            f"({plain['low']:.0f}..{plain['high']:.0f}; {enc['low']:.0f}..{enc['high']:.0f}) | "
            f"{enc['rate'] / plain['rate']:.2f} ({enc['ratio_low']:.2f}..{enc['ratio_high']:.2f}) | "
            f"{plain['cpu']:.2f} / {enc['cpu']:.2f} ms ({plain['gc']:.2f} / {enc['gc']:.2f}) |")


def _first(first: dict[str, float]) -> str:
    if not first["bots"]:
        return "-"
    return (f"{first['bots']:.0f}: {first['plain']:.1f} / {first['capsule']:.1f} s "
            f"({first['capsule'] / first['plain']:.2f}x)")


class Fleets:
    """Fleets of bots, each in a process of its own (scale_bots.py), so that plaintext and
    Capsule are measured like for like: the same imports, a fresh heap, the same send
    pattern. A fleet is one or more processes, each given its own bots, server endpoint and
    partners; they exchange together and the slowest sets the time. Every process is ended
    however the measurement ends (killed if it does not end by itself)."""

    def __init__(self, run_dir: Path, ca_root: Path):
        self.run_dir, self.ca_root = run_dir, ca_root
        self.processes: list[subprocess.Popen[str]] = []
        self.runs = 0

    def __enter__(self) -> Fleets:
        return self

    def __exit__(self, *exc: object) -> None:
        failed = []
        for p in self.processes:  # all told at once: each waits for its receipts, then ends
            try:
                assert p.stdin is not None
                p.stdin.write("\n")
                p.stdin.close()
            except OSError:
                pass  # it died already
        for p in self.processes:
            try:
                p.wait(timeout=600)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.returncode:
                failed.append(p.returncode)
        if failed and exc[0] is None:
            raise RuntimeError(f"fleet processes exited with {failed}")

    def start(self, spec: Spec) -> list[dict[str, float]]:
        """Start one process per (bots, port); returns each one's login figures."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for i, (bots, port) in enumerate(spec):
            path = self.run_dir / f"spec{i}.json"
            path.write_text(json.dumps({"bots": bots, "host": "127.0.0.1", "port": port,
                                        "ca_root": str(self.ca_root)}))
            self.processes.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(path)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True))
        return [json.loads(self._read(p)) for p in self.processes]

    def exchange(self, messages: int) -> dict[str, float]:
        """Every bot sends ``messages`` to its partner, all tagged with this run's name (what
        arrives untagged or from another run is not counted): seconds until the last process
        got all of this run's, the processes' mean RSS per bot by then (KiB), their CPU time
        and the collector's part of it (seconds, all processes)."""
        self.runs += 1
        for p in self.processes:
            assert p.stdin is not None
            p.stdin.write(f"{messages} run{self.runs}\n")
            p.stdin.flush()
        done = [json.loads(self._read(p)) for p in self.processes]
        return {"seconds": max(float(d["seconds"]) for d in done),
                "rss": statistics.mean(float(d["rss_kib_per_bot"]) for d in done),
                "cpu": sum(float(d["cpu_s"]) for d in done),
                "gc": sum(float(d["gc_s"]) for d in done)}

    @staticmethod
    def _read(p: subprocess.Popen[str]) -> str:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"a fleet process died (exit {p.wait()}): see its stderr above")
        return line


Run = dict[str, float]  # an exchange's msg/s, and its CPU and collector ms per message


def _measure(run_dir: Path, ca_root: Path, spec: Spec) -> tuple[dict[str, float], list[Run]]:
    """Log the fleet in, warm it up, then RUNS exchanges: login, RSS per bot once warm (its
    contacts looked up), and the exchanges' figures."""
    bots = sum(len(bots) for bots, _port in spec)
    per_bot = max(1, round(EXCHANGE / bots))
    sent = bots * per_bot
    with Fleets(run_dir, ca_root) as fleets:
        ready = fleets.start(spec)
        warm = fleets.exchange(1)  # warm-up: look-ups and pinning are not throughput
        runs = [fleets.exchange(per_bot) for _ in range(RUNS)]
    return ({"rss": warm["rss"], "login": max(r["login_s"] for r in ready)},
            [{"rate": sent / r["seconds"], "cpu": 1000 * r["cpu"] / sent,
              "gc": 1000 * r["gc"] / sent} for r in runs])


def _login_only(run_dir: Path, ca_root: Path, spec: Spec) -> float:
    with Fleets(run_dir, ca_root) as fleets:
        return max(r["login_s"] for r in fleets.start(spec))


def _summary(rounds: list[tuple[dict[str, float], list[Run]]]) -> dict[str, float]:
    """Medians over the rounds (RSS, login) and over all their exchanges (the rest)."""
    rates = sorted(run["rate"] for _ready, runs in rounds for run in runs)
    return {"rss": statistics.median(ready["rss"] for ready, _runs in rounds),
            "login": statistics.median(ready["login"] for ready, _runs in rounds),
            "rate": statistics.median(rates), "low": rates[0], "high": rates[-1],
            **{k: statistics.median(run[k] for _ready, runs in rounds for run in runs)
               for k in ("cpu", "gc")}}


def _layout(pool: Pool, n: int, ports: list[int], run_dir: Path
            ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Plaintext and Capsule, for ``n`` bots on each of ``ports`` (one process per port);
    bot i of one process sends to bot i of the next (with one process: to bot i + 1).

    The bots new at this size log in first, as plaintext then as Capsule bots (the first
    login of a Capsule bot publishes its certificates: once in its life). Then ROUNDS rounds
    of a plaintext and a Capsule fleet, in the order ABBA…, so that a drift of the machine's
    speed meets both; a pause between fleets lets the server finish the last one's writes.
    Returns plaintext, Capsule (restarted bots) and the first logins."""
    count = n * len(ports)
    bots = pool.grow(count)
    step = n if len(ports) > 1 else 1
    ca_root = pool.stack.info.ca_root
    profiles: list[str | None] = list(pool.profiles_of(bots))

    def spec(kind: str, only_new: bool = False) -> Spec:
        return [([(bots[i][0], bots[i][1], profiles[i] if kind == "capsule" else None,
                   bots[(i + step) % count][0])
                  for i in range(side * n, side * n + n)
                  if not (only_new and bots[i][0] in pool.logged_in)], port)
                for side, port in enumerate(ports)]

    first = {"bots": float(sum(len(b) for b, _p in spec("capsule", only_new=True)))}
    if first["bots"]:
        for kind in ("plain", "capsule"):
            first[kind] = _login_only(run_dir / f"first-{kind}", ca_root,
                                      [(b, port) for b, port in spec(kind, True) if b])
            time.sleep(PAUSE)
        pool.logged_in.update(jid for jid, _pw, _t in bots)
    rounds: dict[str, list[tuple[dict[str, float], list[Run]]]] = {"plain": [], "capsule": []}
    for i in range(ROUNDS):
        for kind in ("plain", "capsule") if i % 2 == 0 else ("capsule", "plain"):
            rounds[kind].append(_measure(run_dir / f"{kind}{i}", ca_root, spec(kind)))
            time.sleep(PAUSE)
    plain, enc = _summary(rounds["plain"]), _summary(rounds["capsule"])
    ratios = sorted(statistics.median(r["rate"] for r in c[1])
                    / statistics.median(r["rate"] for r in p[1])
                    for p, c in zip(rounds["plain"], rounds["capsule"], strict=True))
    enc.update(ratio_low=ratios[0], ratio_high=ratios[-1])
    return plain, enc, first


def _table(title: str, rows: list[str]) -> None:
    print("\n" + "\n".join([title, HEADER, "|---|---|---|---|---|---|---|---|", *rows]))


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> Profiles:
    """Profiles made once and grown to each size in turn, for every layout."""
    return Profiles(tmp_path_factory.mktemp("bench-profiles"))


def bench_bots_in_one_process(xmpp_stack, tmp_path, profiles) -> None:
    pool = Pool(xmpp_stack, profiles, tmp_path / "bots")
    rows = []
    for n in SIZES:
        figures = _layout(pool, n, [xmpp_stack.info.c2s_port], tmp_path / f"{n}")
        rows.append(_row(f"1 process, {xmpp_stack.info.server}", n, *figures))
        print(f"\n{rows[-1]}", flush=True)
    _table("One process of N bots, one server", rows)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    stack = ClusterStack(tmp_path_factory.mktemp("bench-cluster"), nodes=2)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def bench_two_processes_on_a_two_node_cluster(cluster, tmp_path, profiles) -> None:
    pool = Pool(cluster, profiles, tmp_path / "bots")
    ports = [port for _host, port in cluster.info.endpoints[:2]]
    rows = []
    for n in SIZES:
        figures = _layout(pool, n, ports, tmp_path / f"{n}")
        rows.append(_row("2 processes, 2-node ejabberd cluster", n, *figures))
        print(f"\n{rows[-1]}", flush=True)
    _table("Two processes of N bots, one per node of a two-node cluster", rows)


def bench_a_fleet_unlocking_with_default_argon2id(xmpp_stack, tmp_path) -> None:
    """Log in UNLOCK_BOTS bots in one process: plaintext; Capsule with the default Argon2id
    parameters and a salt per profile (one unlock per bot); the same with every profile
    sharing the first's salt (one unlock per process). The Capsule bots restart (their
    certificates are on PEP from a first login); kinds take turns, ROUNDS times."""
    n, port = UNLOCK_BOTS, xmpp_stack.info.c2s_port
    pools = {kind: Pool(xmpp_stack, Profiles(tmp_path / f"{kind}-profiles", KdfParams(),
                                              shared=kind == "shared"), tmp_path / kind)
             for kind in ("own", "shared")}
    specs: dict[str, Spec] = {}
    for kind, pool in pools.items():
        bots = pool.grow(n)
        specs[kind] = [([(jid, pw, path, jid) for (jid, pw, _t), path
                         in zip(bots, pool.profiles_of(bots), strict=True)], port)]
        _login_only(tmp_path / f"first-{kind}", xmpp_stack.info.ca_root, specs[kind])
    specs["plain"] = [([(jid, pw, None, partner) for jid, pw, _p, partner in specs["own"][0][0]],
                       port)]
    kinds = ["plain", "own", "shared"]
    logins: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(ROUNDS):
        for kind in kinds[i % 3:] + kinds[:i % 3]:
            logins[kind].append(_login_only(tmp_path / f"{kind}{i}", xmpp_stack.info.ca_root,
                                            specs[kind]))
            time.sleep(PAUSE)
    plain = statistics.median(logins["plain"])
    cells = [f"{statistics.median(logins[k]):.1f} s ({statistics.median(logins[k]) / plain:.2f}x; "
             f"{min(logins[k]):.1f}..{max(logins[k]):.1f})" for k in ("own", "shared")]
    print(f"\n{n} bots in one process, {xmpp_stack.info.server}, default Argon2id (64 MiB, 3 "
          f"iterations, 4 lanes), log in all (median of {ROUNDS}; lowest..highest):\n"
          f"| bots | plaintext | Capsule, an unlock per bot | Capsule, one shared unlock |\n"
          f"|---|---|---|---|\n"
          f"| {n} | {plain:.1f} s ({min(logins['plain']):.1f}..{max(logins['plain']):.1f}) "
          f"| {cells[0]} | {cells[1]} |", flush=True)
