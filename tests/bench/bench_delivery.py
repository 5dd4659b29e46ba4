"""Delivery after a server crash: time from the server's restart to the last resent capsule
delivered, and to the sender's last receipt (``capsule_delivered``), against the server's own
restart time (its first login) measured in the same runs.

Per run: a burst of capsules, the server SIGKILLed in the middle of it and restarted; the bots
reconnect with back-off, the outbox resends what the server had not acknowledged. Median of
``CAPSULE_BENCH_RUNS`` runs (5); printed, never asserted.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable

RUNS = int(os.environ.get("CAPSULE_BENCH_RUNS", "5"))
BURST = 100


async def _until(done: Callable[[], bool], began: float, limit: float = 120) -> None:
    while not done():
        if time.perf_counter() - began > limit:
            raise AssertionError(f"not delivered within {limit:.0f} s")
        await asyncio.sleep(0.01)


async def bench_delivery_after_server_restart(xmpp_stack, capsule_bot) -> None:
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    delivered: set[str] = set()
    bob.client.add_event_handler("capsule_message", lambda m: delivered.add(m["body"]))
    confirmed: set[str] = set()
    alice.client.add_event_handler("capsule_delivered", lambda d: confirmed.add(d.stanza_id))
    await alice.capsule.send(bob.jid, "warm-up")  # certificates fetched and pinned
    await _until(lambda: "warm-up" in delivered, time.perf_counter())
    ready, last, receipts, resent = [], [], [], []
    for run in range(RUNS):
        before = alice.capsule.outbox.resent
        bodies = [f"run {run} message {i}" for i in range(BURST)]
        ids: list[str] = []
        for i, body in enumerate(bodies):
            if i == BURST // 2:
                xmpp_stack.kill_server()
            ids += await alice.capsule.send(bob.jid, body)
            await asyncio.sleep(0)
        began = time.perf_counter()
        await asyncio.to_thread(xmpp_stack.restart_server)
        ready.append(time.perf_counter() - began)
        await _until(lambda: delivered.issuperset(bodies), began)  # noqa: B023
        last.append(time.perf_counter() - began)
        await _until(lambda: confirmed.issuperset(ids), began)  # noqa: B023
        receipts.append(time.perf_counter() - began)
        resent.append(alice.capsule.outbox.resent - before)
    server, up, done = xmpp_stack.info.server, statistics.median(ready), statistics.median(last)
    print(f"\n{server}: restart -> last resent capsule delivered {done:.2f} s "
          f"(median of {RUNS}; runs {', '.join(f'{t:.2f}' for t in last)}); "
          f"restart -> last receipt {statistics.median(receipts):.2f} s; "
          f"restart -> server's first login {up:.2f} s; ratio {done / up:.2f}; "
          f"capsules resent per run {statistics.median(resent):.0f} of {BURST}")
