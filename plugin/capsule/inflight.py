"""Work on the stream's messages that the stream's end waits for: capsules being opened and
confirmed (their receipts) and messages being sealed. The server drops what a client writes
after the end of its stream, so the app's ``disconnect()`` ends it once this work is done, or
``wait`` seconds have passed (:meth:`capsule.plugin.XEP_Capsule._disconnect`)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from capsule.durability import Spawn


class InFlight:
    """The tasks started through :meth:`spawn` and not yet done."""

    def __init__(self, spawn: Spawn) -> None:
        self._spawn = spawn
        self._tasks: set[asyncio.Future[None]] = set()
        self.started = 0  # tasks started so far

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = self._spawn(work)
        self.started += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    async def done(self, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, until the work started so far is done, and the
        work it starts meanwhile (a capsule's receipt follows its opening)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
