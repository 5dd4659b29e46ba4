"""The stream management (XEP-0198) count of handled stanzas, advanced only once handled.

slixmpp's xep_0198 counts a stanza as handled the moment it arrives, and acks that count when
the server asks. A capsule is verified, decrypted and delivered later, by a task: a receiver
killed in between would have acked capsules it never delivered, and the server would drop
them. This count takes over from slixmpp's: a capsule counts once its task finished (delivered
or refused), and the count only covers an unbroken prefix of the stream, so the server keeps,
and resends or stores offline, everything from the first capsule not yet done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from slixmpp import BaseXMPP, Iq, Message, Presence
from slixmpp.plugins.xep_0198.stream_management import MAX_SEQ
from slixmpp.xmlstream import StanzaBase


class HandledCount:
    """Counts incoming stanzas for XEP-0198 acks only when handled, in stream order."""

    def __init__(self, xmpp: BaseXMPP):
        self.xmpp = xmpp
        self.sm = xmpp.plugin["xep_0198"]
        self._stream = 0  # a new count per enabled or resumed stream
        self._base = 0  # the handled count when this stream's numbering began
        self._next = 0  # position of the next incoming stanza in this stream
        self._done = 0  # length of the handled prefix
        self._finished: set[int] = set()  # handled, beyond the prefix
        self._seq: dict[int, tuple[int, int]] = {}  # id(stanza) -> (stream, position)
        self._claimed: set[int] = set()
        self._ack: asyncio.Handle | None = None
        xmpp.del_filter("in", self.sm._handle_incoming)  # ours replaces it
        xmpp.add_filter("in", self._arrive)  # first: created before any other "in" filter
        xmpp.add_event_handler("sm_enabled", self._restart)
        xmpp.add_event_handler("session_resumed", self._restart)

    def close(self) -> None:
        self.xmpp.del_filter("in", self._arrive)
        self.xmpp.del_event_handler("sm_enabled", self._restart)
        self.xmpp.del_event_handler("session_resumed", self._restart)
        self.xmpp.add_filter("in", self.sm._handle_incoming)

    def _restart(self, _event: Any) -> None:
        self._stream += 1
        self._base, self._next, self._done = self.sm.handled, 0, 0
        self._finished.clear()

    def _arrive(self, stanza: StanzaBase) -> StanzaBase:
        if self.sm.enabled_in and isinstance(stanza, Message | Presence | Iq):
            self._seq[id(stanza)] = (self._stream, self._next)
            self._next += 1
            # unless a capsule task claims it meanwhile, it is handled once dispatched
            asyncio.get_event_loop().call_soon(self._settle, stanza)
        return stanza

    def _settle(self, stanza: StanzaBase) -> None:
        if id(stanza) in self._claimed:
            self._claimed.discard(id(stanza))
        else:
            self._finish(stanza)

    def hold(self, stanza: StanzaBase, task: Coroutine[Any, Any, None]
             ) -> Coroutine[Any, Any, None]:
        """``task`` (the handling of ``stanza``), after which alone the stanza counts."""
        if id(stanza) in self._seq:
            self._claimed.add(id(stanza))  # now, before the stanza's dispatch settles it
        return self._run(stanza, task)

    async def _run(self, stanza: StanzaBase, task: Coroutine[Any, Any, None]) -> None:
        try:
            await task
        finally:
            self._finish(stanza)

    def _finish(self, stanza: StanzaBase) -> None:
        stream, position = self._seq.pop(id(stanza), (-1, 0))
        if stream != self._stream:  # unknown, or from a stream that is gone: resent anyway
            return
        self._finished.add(position)
        while self._done in self._finished:
            self._finished.discard(self._done)
            self._done += 1
        self.sm.handled = (self._base + self._done) % MAX_SEQ
        if self._ack is None and not self._finished:  # one ack per batch handled
            self._ack = asyncio.get_event_loop().call_soon(self._send_ack)

    def _send_ack(self) -> None:
        """Tell the server unasked once a backlog is handled, so it can let go of it."""
        self._ack = None
        if self.xmpp.transport is not None and self.sm.enabled_in:
            self.sm.send_ack()
