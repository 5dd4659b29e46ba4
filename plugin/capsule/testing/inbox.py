"""Await what a bot received: its ``message`` and ``capsule_error`` events, in order."""

from __future__ import annotations

import asyncio
from typing import Any

from slixmpp import ClientXMPP, Message


class Inbox:
    """Collects a bot's ``message`` and ``capsule_error`` events."""

    def __init__(self, client: ClientXMPP):
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.errors: asyncio.Queue[Any] = asyncio.Queue()
        client.add_event_handler("message", self.messages.put_nowait)
        client.add_event_handler("capsule_error", self.errors.put_nowait)

    async def message(self, timeout: float = 15) -> Message:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def error(self, timeout: float = 15) -> Any:
        return await asyncio.wait_for(self.errors.get(), timeout)

    async def nothing(self, wait: float = 1.0) -> None:
        await asyncio.sleep(wait)
        assert self.messages.empty(), f"unexpected message {self.messages.get_nowait()['body']!r}"
