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
from dataclasses import dataclass
from pathlib import Path

import pytest
from scale_bots import PIN, Fleet  # beside this file (tests/bench is on sys.path)

from capsule.testing.identities import enroll
from capsule_stack.cluster import ClusterStack
from capsule_stack.stack import Stack

SIZES = [int(n) for n in os.environ.get("CAPSULE_BENCH_BOTS", "50,100,200,500").split(",")]
MESSAGES = int(os.environ.get("CAPSULE_BENCH_BOT_MESSAGES", "5"))
RUNS = int(os.environ.get("CAPSULE_BENCH_RUNS", "3"))
WORKER = Path(__file__).with_name("scale_bots.py")
HEADER = ("| layout | bots | RSS per bot, plaintext / Capsule | log in all, plaintext / Capsule "
          "| msg/s, plaintext / Capsule | ratio |")


@dataclass(frozen=True)
class Pool:
    """Accounts with enrolled profiles (templates: each run copies them fresh)."""

    stack: Stack
    directory: Path
    bots: list[tuple[str, str, Path]]  # jid, password, profile template

    def grow(self, n: int) -> None:
        authority = self.stack.authority()
        while len(self.bots) < n:
            user, password = f"bot{len(self.bots)}-{secrets.token_hex(3)}", secrets.token_hex(8)
            jid = self.stack.adduser(user, password)
            enroll(authority, self.directory / f"{user}.capsule", jid, PIN)
            self.bots.append((jid, password, self.directory / f"{user}.capsule"))

    def profiles(self, bots: list[tuple[str, str, Path]], run_dir: Path) -> list[str]:
        run_dir.mkdir(parents=True, exist_ok=True)
        return [str(shutil.copy(template, run_dir / template.name)) for _j, _p, template in bots]


def _row(layout: str, n: int, plain: dict[str, float], enc: dict[str, float]) -> str:
    return (f"| {layout} | {n} | {plain['rss']:.0f} / {enc['rss']:.0f} KiB | "
            f"{plain['login']:.1f} / {enc['login']:.1f} s ({enc['login'] / plain['login']:.2f}x) | "
            f"{plain['rate']:.0f} / {enc['rate']:.0f} | {enc['rate'] / plain['rate']:.2f} |")


async def _one_process(stack: Stack, pool: Pool, n: int, run_dir: Path, capsule: bool
                       ) -> dict[str, float]:
    bots = pool.bots[:n]
    profiles: list[str | None] = (list(pool.profiles(bots, run_dir)) if capsule
                                  else [None] * n)
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
def pools() -> dict[str, Pool]:
    """Accounts and profiles per server, made once and grown to each size in turn."""
    return {}


async def bench_bots_in_one_process(xmpp_stack, tmp_path, pools) -> None:
    pool = pools.setdefault(xmpp_stack.info.server, Pool(xmpp_stack, tmp_path / "templates", []))
    pool.directory.mkdir(exist_ok=True)
    rows = []
    for n in SIZES:
        pool.grow(n)
        plain = await _one_process(xmpp_stack, pool, n, tmp_path / f"plain{n}", capsule=False)
        enc = await _one_process(xmpp_stack, pool, n, tmp_path / f"capsule{n}", capsule=True)
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
    bots = pool.bots[:2 * n]
    profiles: list[str | None] = (list(pool.profiles(bots, run_dir)) if capsule
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
            p.communicate("\n", timeout=120)
    return {"rss": statistics.mean(r["rss_kib_per_bot"] for r in ready),
            "login": max(r["login_s"] for r in ready), "rate": statistics.median(rates)}


def bench_two_processes_on_a_two_node_cluster(cluster, tmp_path, pools) -> None:
    pool = pools.setdefault("cluster", Pool(cluster, tmp_path / "templates", []))
    pool.directory.mkdir(exist_ok=True)
    rows = []
    for n in SIZES:
        pool.grow(2 * n)
        plain = _two_processes(cluster, pool, n, tmp_path / f"plain{n}", capsule=False)
        enc = _two_processes(cluster, pool, n, tmp_path / f"capsule{n}", capsule=True)
        rows.append(_row("2 processes, 2-node ejabberd cluster", n, plain, enc))
        print(f"\n{rows[-1]}", flush=True)
    print("\n" + "\n".join([HEADER, "|---|---|---|---|---|---|", *rows]))
