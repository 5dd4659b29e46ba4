"""Bot-to-bot messages per second through the real server, encrypted vs plaintext, same run.

Goal (issue 3): encrypted / plaintext >= 0.6 with the shaper off. Both bots share one
process (and so one core for all crypto); printed, never asserted.
"""

from __future__ import annotations

import asyncio
import os
import time

from slixmpp import ClientXMPP

COUNT = int(os.environ.get("CAPSULE_BENCH_MESSAGES", "300"))


async def _drain(queue: asyncio.Queue[object], count: int) -> None:
    for _ in range(count):
        await asyncio.wait_for(queue.get(), 60)


async def bench_messages_per_second(xmpp_stack, new_account, connect, capsule_bot) -> None:
    a, b = new_account("plain-a"), new_account("plain-b")
    sender, receiver = await connect(a), await connect(b)
    got: asyncio.Queue[object] = asyncio.Queue()
    receiver.add_event_handler("message", got.put_nowait)
    began = time.perf_counter()
    for i in range(COUNT):
        sender.send_message(mto=b.jid, mbody=f"plain {i}", mtype="chat")
    await _drain(got, COUNT)
    plain = COUNT / (time.perf_counter() - began)

    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    got_enc: asyncio.Queue[object] = asyncio.Queue()
    bob.client.add_event_handler("capsule_message", got_enc.put_nowait)
    await alice.capsule.send(bob.jid, "warm-up: fetch and pin certificates")
    await _drain(got_enc, 1)
    began = time.perf_counter()
    for i in range(COUNT):
        await alice.capsule.send(bob.jid, f"secret {i}")
    await _drain(got_enc, COUNT)
    encrypted = COUNT / (time.perf_counter() - began)
    assert isinstance(alice.client, ClientXMPP)
    print(f"\n{xmpp_stack.info.server}: {COUNT} messages: plaintext {plain:.0f} msg/s, "
          f"encrypted {encrypted:.0f} msg/s, ratio {encrypted / plain:.2f} (goal >= 0.6)")
