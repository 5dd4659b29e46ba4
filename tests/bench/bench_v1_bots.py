"""Bot to bot over the real server, receiver in its own process: v1 against v0 msg/s, same run.

The sender (this process) pipelines COUNT capsules; the receiver (tests/receiver_bot.py) prints
one line per delivered capsule. v0 is forced by telling the sender the receiver has no session
keys (believed for 60 s). Median of 3 rounds per version; printed, never asserted.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from capsule.testing.identities import enroll
from tests.helpers import BOT_PIN, Receiver

COUNT = int(os.environ.get("CAPSULE_BENCH_MESSAGES", "500"))
ROUNDS = 3


async def bench_v1_against_v0_bot_to_bot(xmpp_stack, new_account, capsule_bot, tmp_path) -> None:
    alice = await capsule_bot("alice")
    bob = new_account("bob")
    profile = tmp_path / "bob.capsule"
    enroll(xmpp_stack.authority(), profile, bob.jid, BOT_PIN)
    lines: list[list[str]] = []
    receiver = Receiver(lines)
    await receiver.start(xmpp_stack, bob, profile)
    try:
        rates: dict[str, list[float]] = {"v1": [], "v0": []}
        await alice.capsule.send(bob.jid, "warm-up: certificates and session keys")
        await _until(lambda: len(lines) >= 1)
        for _ in range(ROUNDS):
            for version in ("v1", "v0"):
                contact = await alice.capsule.contact(bob.jid)
                if version == "v0":
                    alice.capsule.keyring.learn(bob.jid, contact.sign, [], int(time.time()))
                else:
                    alice.capsule.keyring._peers.pop(bob.jid, None)  # fetched again: v1
                    await alice.capsule.keyring.peer(bob.jid, contact.sign, int(time.time()))
                start = len(lines)
                began = time.perf_counter()
                for i in range(COUNT):
                    await alice.capsule.send(bob.jid, f"{version} {i}")
                await _until(lambda start=start: len(lines) >= start + COUNT, 300)
                rates[version].append(COUNT / (time.perf_counter() - began))
        errors = [line for line in lines if line[0] == "error"]
        v1, v0 = statistics.median(rates["v1"]), statistics.median(rates["v0"])
        print(f"\n{xmpp_stack.info.server}, {COUNT} capsules, receiver in its own process, "
              f"median of {ROUNDS}: v1 {v1:.0f} msg/s, v0 {v0:.0f} msg/s -> v1/v0 {v1 / v0:.2f}"
              f" ({len(errors)} errors)")
    finally:
        await receiver.kill()


async def _until(predicate, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("the receiver did not get every capsule in time")
        await asyncio.sleep(0.02)
