"""Many bots in one process: log them all in, then every bot sends to its partner; the figures
the scaling benchmark prints. Also run as a program (one of the cluster layout's processes):

    python scale_bots.py SPEC.json   # logs in and prints its figures (JSON); then per line
                                     # "M RUN" on stdin sends M per bot tagged RUN, prints
                                     # {"seconds", "rss_kib_per_bot", "cpu_s", "gc_s"}:
                                     # the process's CPU time, and of it the collector's

SPEC: {"bots": [[jid, password, profile-or-null, partner-jid], ...], "host", "port", "ca_root"};
a null profile is a plaintext bot.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from slixmpp import JID, ClientXMPP
from slixmpp.plugins.base import PluginManager

from capsule.connection import login
from capsule.plugin import attach_async

PIN = "482916"
# CAPSULE_BENCH_ROOMS=0: the Capsule bots run with rooms=False (they join no room)
OPTIONS = {"rooms": False} if os.environ.get("CAPSULE_BENCH_ROOMS") == "0" else {}


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@dataclass
class Fleet:
    """N bots of one process, each with the partner it sends to."""

    spec: list[tuple[str, str, str | None, str]]
    host: str
    port: int
    ca_root: str
    clients: list[ClientXMPP] = field(default_factory=list)
    # messages counted per run tag (a message of another run, or untagged, e.g. one left from
    # an earlier fleet of these accounts, counts for nothing); the other process's capsules
    # may come before this one is told to start the run: counted all the same
    received: Counter[str] = field(default_factory=Counter)
    run: str = ""
    all_in: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0
    rss_before: int = 0
    sent: int = 0  # capsules sent, and whether all of them have their receipt (or failed)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    errors: list[str] = field(default_factory=list)  # capsule_error reasons
    # what the senders' outboxes heard of their capsules, to tell where missing ones were lost
    outcomes: Counter[str] = field(default_factory=Counter)
    gc_seconds: float = 0.0  # CPU time of this thread in the garbage collector, all told
    _gc_began: float = 0.0
    # 500 logins at once stalled ejabberd here (23 TCP connections never got a session, for
    # plaintext bots too): a fleet starts its bots a hundred at a time
    logging_in: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(100))

    def time_collections(self) -> None:
        """Count the collector's CPU time from now on (where a fleet's CPU goes as it grows)."""
        gc.callbacks.append(self._collecting)

    def _collecting(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_began = time.thread_time()
        else:
            self.gc_seconds += time.thread_time() - self._gc_began

    async def log_in(self) -> dict[str, float]:
        self.rss_before, began = rss_kib(), time.perf_counter()
        await asyncio.gather(*(self._one(*bot) for bot in self.spec))
        return {"login_s": time.perf_counter() - began, "rss_kib_per_bot": self.rss_per_bot()}

    def rss_per_bot(self) -> float:
        """What the process grew by since just before the logins, per bot (KiB)."""
        return (rss_kib() - self.rss_before) / len(self.spec)

    async def _one(self, jid: str, password: str, profile: str | None, _partner: str) -> None:
        async with self.logging_in:  # at most 100 at a time, plaintext or not
            await self._log_in_one(jid, password, profile)

    async def _log_in_one(self, jid: str, password: str, profile: str | None) -> None:
        client = ClientXMPP(jid, password)
        self.clients.append(client)
        published = await attach_async(client, profile, PIN, **OPTIONS) if profile else None
        event = "capsule_message" if profile else "message"
        client.add_event_handler(event, self._got)
        client.add_event_handler("capsule_error", lambda failure: self.errors.append(
            failure.reason))
        client.add_event_handler("session_start", lambda _: client.send_presence())
        for outcome in ("capsule_acked", "capsule_delivered", "capsule_undelivered"):
            client.add_event_handler(outcome, lambda _e, o=outcome: self._outcome(o))
        await login(client, self.host, self.port, self.ca_root, timeout=900)
        if published is not None:
            await published(900)

    def _got(self, msg: Any) -> None:
        run = str(msg["body"]).split(" ", 1)[0]
        self.received[run] += 1
        if run == self.run and self.received[run] >= self.expected:
            self.all_in.set()

    async def exchange(self, messages: int, run: str) -> float:
        """Every bot sends ``messages`` to its partner, tagged ``run``; seconds until this
        fleet got as many of the run's."""
        self.run, self.expected = run, messages * len(self.spec)
        self.all_in.clear()
        if self.received[run] >= self.expected:
            self.all_in.set()
        began = time.perf_counter()
        for i in range(messages):
            for client, (_jid, _pw, profile, partner) in zip(self.clients, self.spec, strict=True):
                if profile:
                    await cast(PluginManager, client.plugin)["capsule"].send(partner,
                                                                             f"{run} {i}")
                    self.sent += 1
                    self.settled.clear()
                else:
                    client.send_message(mto=JID(partner), mbody=f"{run} {i}", mtype="chat")
            await asyncio.sleep(0)
        try:
            await asyncio.wait_for(self.all_in.wait(), 600)
        except TimeoutError:
            raise TimeoutError(f"{self.received[run]} of {self.expected} messages arrived in "
                               f"600 s; errors: {self.errors}; this fleet's capsules since it "
                               f"started: {dict(self.outcomes)}") from None
        return time.perf_counter() - began

    def _outcome(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if self.outcomes["capsule_delivered"] + self.outcomes["capsule_undelivered"] >= self.sent:
            self.settled.set()

    async def close(self) -> None:
        """Stop as an operator stops a bot: once every capsule's receipt is in (at most
        30 s), so that the next start of these bots has nothing left to send again."""
        if self.sent:
            try:
                await asyncio.wait_for(self.settled.wait(), 30)
            except TimeoutError:
                print(f"not settled: {dict(self.outcomes)} of {self.sent} capsules",
                      file=sys.stderr)
        await asyncio.gather(*(c.disconnect(wait=2) for c in self.clients if c.is_connected()))


async def _program(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    fleet = Fleet([tuple(bot) for bot in spec["bots"]], spec["host"], spec["port"],
                  spec["ca_root"])
    fleet.time_collections()
    print(json.dumps(await fleet.log_in()), flush=True)
    if os.environ.get("CAPSULE_BENCH_GC_FREEZE"):  # what the logins made: never collected again
        gc.freeze()
    if os.environ.get("CAPSULE_BENCH_GC") == "off":  # no collections at all from now on: what
        gc.disable()  # grows with the bots then is the fleet's own work, not the collector's
    loop = asyncio.get_running_loop()
    while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip():
        messages, run = line.split()  # each line: messages per bot and the run's tag, then go
        cpu, collecting = time.process_time(), fleet.gc_seconds
        seconds = await fleet.exchange(int(messages), run)
        print(json.dumps({"seconds": seconds, "rss_kib_per_bot": fleet.rss_per_bot(),
                          "cpu_s": time.process_time() - cpu,
                          "gc_s": fleet.gc_seconds - collecting}), flush=True)
    await fleet.close()


if __name__ == "__main__":
    asyncio.run(_program(sys.argv[1]))
