"""Many bots per process, plaintext against Capsule in the same run (issue 15).

Layout 1: N bots in this process, one server node. Layout 2: two processes of N bots each on
the two nodes of an ejabberd cluster, every bot sending to its partner on the other node.
Per N: RSS per bot after logging all in, time to log all in (concurrently), messages per
second (every bot sends CAPSULE_BENCH_BOT_MESSAGES to its partner; median of
CAPSULE_BENCH_RUNS exchanges after a warm-up capsule per pair), and encrypted / plaintext.
Sizes: CAPSULE_BENCH_BOTS (default 50,100,200,500). Printed, never asserted.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from scale_bots import PIN, Fleet  # beside this file (tests/bench is on sys.path)
from slixmpp import JID

from capsule.testing.identities import enroll
from capsule_ca import Authority
from capsule_stack.cluster import ClusterStack
from capsule_stack.stack import Stack
from capsule_stack.state import DEFAULT_DOMAIN

SIZES = [int(n) for n in os.environ.get("CAPSULE_BENCH_BOTS", "50,100,200,500").split(",")]
MESSAGES = int(os.environ.get("CAPSULE_BENCH_BOT_MESSAGES", "5"))
RUNS = int(os.environ.get("CAPSULE_BENCH_RUNS", "3"))
WORKER = Path(__file__).with_name("scale_bots.py")
CA_PASSPHRASE = b"bench CA passphrase"
HEADER = ("| layout | bots | RSS per bot, plaintext / Capsule | log in all, plaintext / Capsule "
          "| msg/s, plaintext / Capsule | ratio |")


class Profiles:
    """Enrolled profile templates shared by both layouts (each run copies them fresh), all
    certified by one throwaway CA, so that any two of them trust each other whichever stack
    their accounts are on (every stack serves the same domain). Made in parallel processes:
    a profile's RSA key generation and its certificates cost ≈ 0.2 s, 1,000 of them minutes."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.ca_dir = directory / "ca"
        Authority.init(self.ca_dir, "Bench CA", CA_PASSPHRASE)
        self.bots: list[tuple[str, str, Path]] = []  # jid, password, profile template

    def grow(self, n: int) -> None:
        new = [(f"bot{i}-{secrets.token_hex(3)}@{DEFAULT_DOMAIN}", secrets.token_hex(8),
                self.directory / f"bot{i}.capsule") for i in range(len(self.bots), n)]
        if new:
            with ProcessPoolExecutor(os.cpu_count(), initializer=_open_ca,
                                     initargs=(self.ca_dir,)) as workers:
                list(workers.map(_enroll, [(jid, path) for jid, _pw, path in new],
                                 chunksize=8))
            self.bots += new


_ca: Authority | None = None  # a worker process's own handle on the bench CA


def _open_ca(ca_dir: Path) -> None:
    global _ca
    _ca = Authority(ca_dir, CA_PASSPHRASE)


def _enroll(job: tuple[str, Path]) -> None:
    assert _ca is not None
    enroll(_ca, job[1], job[0], PIN)  # the CA's lock serialises its part


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


def _row(layout: str, n: int, plain: dict[str, float], enc: dict[str, float]) -> str:
    return (f"| {layout} | {n} | {plain['rss']:.0f} / {enc['rss']:.0f} KiB | "
            f"{plain['login']:.1f} / {enc['login']:.1f} s ({enc['login'] / plain['login']:.2f}x) | "
            f"{plain['rate']:.0f} / {enc['rate']:.0f} | {enc['rate'] / plain['rate']:.2f} |")


async def _one_process(stack: Stack, pool: Pool, n: int, capsule: bool) -> dict[str, float]:
    bots = pool.grow(n)
    profiles: list[str | None] = list(pool.profiles_of(bots)) if capsule else [None] * n
    spec = [(jid, pw, profile, bots[(i + 1) % n][0])
            for i, ((jid, pw, _t), profile) in enumerate(zip(bots, profiles, strict=True))]
    fleet = Fleet(spec, "127.0.0.1", stack.info.c2s_port, str(stack.info.ca_root))
    try:
        ready = await fleet.log_in()
        await fleet.warm_up()
        rates = [MESSAGES * n / await fleet.exchange(MESSAGES) for _ in range(RUNS)]
    finally:
        await fleet.close()
    return {"rss": ready["rss_kib_per_bot"], "login": ready["login_s"],
            "rate": statistics.median(rates)}


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> Profiles:
    """Profiles made once and grown to each size in turn, for every layout."""
    return Profiles(tmp_path_factory.mktemp("bench-profiles"))


async def bench_bots_in_one_process(xmpp_stack, tmp_path, profiles) -> None:
    pool = Pool(xmpp_stack, profiles, tmp_path / "bots")
    rows = []
    for n in SIZES:
        plain = await _one_process(xmpp_stack, pool, n, capsule=False)
        enc = await _one_process(xmpp_stack, pool, n, capsule=True)
        rows.append(_row(f"1 process, {xmpp_stack.info.server}", n, plain, enc))
        print(f"\n{rows[-1]}", flush=True)
    print("\n" + "\n".join([HEADER, "|---|---|---|---|---|---|", *rows]))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    stack = ClusterStack(tmp_path_factory.mktemp("bench-cluster"), nodes=2)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _two_processes(cluster: ClusterStack, pool: Pool, n: int, run_dir: Path, capsule: bool
                   ) -> dict[str, float]:
    bots = pool.grow(2 * n)
    profiles: list[str | None] = (list(pool.profiles_of(bots)) if capsule
                                  else [None] * (2 * n))
    halves = []
    for side in (0, 1):  # bot i of one process sends to bot i of the other
        mine = range(side * n, side * n + n)
        spec = {"bots": [(bots[i][0], bots[i][1], profiles[i], bots[(i + n) % (2 * n)][0])
                         for i in mine],
                "host": "127.0.0.1", "port": cluster.info.endpoints[side][1],
                "ca_root": str(cluster.info.ca_root)}
        path = run_dir / f"spec{side}.json"
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec))
        halves.append(subprocess.Popen([sys.executable, str(WORKER), str(path)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        ready = [json.loads(p.stdout.readline()) for p in halves]  # type: ignore[union-attr]

        def exchange(messages: int) -> float:
            for p in halves:
                p.stdin.write(f"{messages}\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            return max(float(json.loads(p.stdout.readline())["seconds"])  # type: ignore[union-attr]
                       for p in halves)

        exchange(1)  # warm-up: look-ups and pinning
        rates = [2 * n * MESSAGES / exchange(MESSAGES) for _ in range(RUNS)]
    finally:
        for p in halves:
            p.communicate("\n", timeout=600)
    return {"rss": statistics.mean(r["rss_kib_per_bot"] for r in ready),
            "login": max(r["login_s"] for r in ready), "rate": statistics.median(rates)}


def bench_two_processes_on_a_two_node_cluster(cluster, tmp_path, profiles) -> None:
    pool = Pool(cluster, profiles, tmp_path / "bots")
    rows = []
    for n in SIZES:
        plain = _two_processes(cluster, pool, n, tmp_path / f"plain{n}", capsule=False)
        enc = _two_processes(cluster, pool, n, tmp_path / f"capsule{n}", capsule=True)
        rows.append(_row("2 processes, 2-node ejabberd cluster", n, plain, enc))
        print(f"\n{rows[-1]}", flush=True)
    print("\n" + "\n".join([HEADER, "|---|---|---|---|---|---|", *rows]))
