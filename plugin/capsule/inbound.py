"""The stream management (XEP-0198) count of handled stanzas, advanced only once handled.

slixmpp's xep_0198 counts a stanza as handled the moment it arrives, and acks that count when
the server asks. A capsule is verified, decrypted and delivered later, by a task: a receiver
killed in between would have acked capsules it never delivered, and the server would drop
them. This count takes over from slixmpp's: a capsule counts once its task finished (delivered
or refused), and the count only covers an unbroken prefix of the stream, so the server keeps,
and resends or stores offline, everything from the first capsule not yet done.

It answers the server's requests too: a request (``<r/>``) that arrives while capsules before
it are still being handled is answered once they are (at most ANSWER_WITHIN seconds later,
then with what is handled, and unasked once the rest is), so a capsule costs the stream one
request and one answer rather than an answer at once and another when handled (ejabberd asks
again after every answer while it has unacked stanzas: each extra answer was an extra round).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from slixmpp import BaseXMPP, Iq, Message, Presence
from slixmpp.plugins.xep_0198.stream_management import MAX_SEQ
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

SLIXMPP_ANSWER = "Stream Management Request Ack"  # xep_0198's handler of <r/>: ours replaces it
ANSWER_WITHIN = 2.0  # seconds a request waits for the capsules before it (ejabberd waits 60)


# marks an incoming stanza carries while it is counted (on the stanza itself: keyed by its id()
# they would pass to another stanza once this one is freed)
_POSITION = "capsule_sm_position"  # (stream, position in it)
_CLAIMED = "capsule_sm_claimed"  # a capsule task counts it once done, not its dispatch


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
        self._asked = 0  # a request is owed an answer covering this prefix (0: none owed)
        self._late: asyncio.TimerHandle | None = None  # the answer, should they take long
        xmpp.del_filter("in", self.sm._handle_incoming)  # ours replaces it
        xmpp.add_filter("in", self._arrive)  # first: created before any other "in" filter
        self._requests = MatchXPath(self.sm.stanza.RequestAck.tag_name())
        xmpp.remove_handler(SLIXMPP_ANSWER)
        xmpp.register_handler(Callback("capsule ack request", self._requests, self._request,
                                       instream=True))
        xmpp.add_event_handler("sm_enabled", self._restart)
        xmpp.add_event_handler("session_resumed", self._restart)

    def close(self) -> None:
        self.xmpp.del_filter("in", self._arrive)
        self.xmpp.del_event_handler("sm_enabled", self._restart)
        self.xmpp.del_event_handler("session_resumed", self._restart)
        self.xmpp.add_filter("in", self.sm._handle_incoming)
        self.xmpp.remove_handler("capsule ack request")
        self.xmpp.register_handler(Callback(SLIXMPP_ANSWER, self._requests,
                                            self.sm._handle_request_ack, instream=True))
        self._cancel_answer()

    def _restart(self, _event: Any) -> None:
        self._stream += 1
        self._base, self._next, self._done = self.sm.handled, 0, 0
        self._finished.clear()
        self._asked = 0
        self._cancel_answer()

    def _request(self, _request: StanzaBase) -> None:
        """The server asks how far we got: answered once what came before it is handled."""
        self._asked = max(self._asked, self._next)
        if self._done >= self._asked:
            self._asked = 0
            self._send_ack()
        elif self._late is None:
            self._late = asyncio.get_event_loop().call_later(ANSWER_WITHIN, self._answer_late)

    def _arrive(self, stanza: StanzaBase) -> StanzaBase:
        if self.sm.enabled_in and isinstance(stanza, Message | Presence | Iq):
            setattr(stanza, _POSITION, (self._stream, self._next))
            self._next += 1
            # unless a capsule task claims it meanwhile, it is handled once dispatched
            asyncio.get_event_loop().call_soon(self._settle, stanza)
        return stanza

    def _settle(self, stanza: StanzaBase) -> None:
        if not stanza.__dict__.pop(_CLAIMED, False):
            self._finish(stanza)

    def hold(self, stanza: StanzaBase, task: Coroutine[Any, Any, None]
             ) -> Coroutine[Any, Any, None]:
        """``task`` (the handling of ``stanza``), after which alone the stanza counts."""
        if hasattr(stanza, _POSITION):
            setattr(stanza, _CLAIMED, True)  # now, before the stanza's dispatch settles it
        return self._run(stanza, task)

    async def _run(self, stanza: StanzaBase, task: Coroutine[Any, Any, None]) -> None:
        try:
            await task
        finally:
            self._finish(stanza)

    def _finish(self, stanza: StanzaBase) -> None:
        stream, position = stanza.__dict__.pop(_POSITION, (-1, 0))
        if stream != self._stream:  # unknown, or from a stream that is gone: resent anyway
            return
        self._finished.add(position)
        while self._done in self._finished:
            self._finished.discard(self._done)
            self._done += 1
        self.sm.handled = (self._base + self._done) % MAX_SEQ
        if self._asked and self._done >= self._asked:  # what the server asked about is done
            self._asked = 0
            self._cancel_answer()
            asyncio.get_event_loop().call_soon(self._send_ack)  # after the whole batch

    def _answer_late(self) -> None:
        """What is handled so far; the rest is told unasked once handled (see _finish), so
        that the server can let go of it."""
        self._late = None
        self._send_ack()

    def _send_ack(self) -> None:
        if self.xmpp.transport is not None and self.sm.enabled_in:
            self.sm.send_ack()

    def _cancel_answer(self) -> None:
        if self._late is not None:
            self._late.cancel()
            self._late = None
