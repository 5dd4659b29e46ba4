"""Sealed capsules kept until the server acknowledges them (XEP-0198), then reported.

Every capsule that leaves is held here, keyed by stanza id, until the server's stream
management ack covers it (``capsule_acked``). slixmpp itself resends its unacked stanzas when a
stream is *resumed*; when resumption fails (the server restarted) the session is new and
slixmpp forgets them, so the outbox sends again every capsule that went out unacknowledged,
once stream management is on again. While no connection is up, capsules wait here rather than in
slixmpp's queues (which would write them into the next connection before its login).
A capsule not acknowledged within ``timeout`` seconds, one the outbox has no room for, and one
the server returns with an error, are reported as ``capsule_undelivered`` and never sent
again. A resent capsule is the identical stanza: the receiver drops the copy as a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slixmpp import BaseXMPP, Message
from slixmpp.xmlstream import StanzaBase

from capsule import stanza as st
from capsule.errors import Undelivered

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acked:
    """The payload of ``capsule_acked``: the server has taken this capsule."""

    stanza_id: str
    peer: str


@dataclass
class _Pending:
    stanza: Message
    timer: asyncio.TimerHandle
    out: bool = False  # written to a stream or waiting for one: (re)sent on the next stream


class Outbox:
    """Capsules sent but not yet acknowledged; resent on a new stream, reported on timeout."""

    def __init__(self, xmpp: BaseXMPP, timeout: float, limit: int,
                 report: Callable[[Undelivered, StanzaBase, str], Any]):
        self.xmpp = xmpp
        self.timeout = timeout
        self.limit = limit
        self.report = report
        self.pending: OrderedDict[str, _Pending] = OrderedDict()
        self._given_up: OrderedDict[str, None] = OrderedDict()  # never to be sent again
        self._acked: OrderedDict[str, str] = OrderedDict()  # id -> peer, to report bounces
        self._ack_request: asyncio.Handle | None = None
        self.resent = 0
        # an "out" filter runs before xep_0198's "out_sync" one: a refused stanza is not counted
        xmpp.add_filter("out", self._on_wire)
        for event, handler in self._events():
            xmpp.add_event_handler(event, handler)
        sm = xmpp.plugin["xep_0198"]
        if getattr(xmpp, "sessionstarted", False) and not sm.enabled_out:  # logged in already
            enable = sm.stanza.Enable(xmpp)
            enable["resume"] = sm.allow_resume
            enable.send()

    def _events(self) -> list[tuple[str, Callable[..., Any]]]:
        return [("stanza_acked", self._on_acked),
                ("sm_enabled", self._resend), ("session_resumed", self._resend),
                ("disconnected", self._down), ("message_error", self._on_bounce)]

    def close(self) -> None:
        self.xmpp.del_filter("out", self._on_wire)
        for event, handler in self._events():
            self.xmpp.del_event_handler(event, handler)
        for entry in self.pending.values():
            entry.timer.cancel()
        if self._ack_request:
            self._ack_request.cancel()

    def send(self, msg: Message) -> None:
        """Send a sealed capsule; its delivery bound starts now, even while no stream is up."""
        self.track(msg)
        if self.xmpp.transport is not None:  # slixmpp holds it until the session is up
            self.xmpp.send(msg)
        elif msg["id"] in self.pending:
            self.pending[msg["id"]].out = True  # sent once a stream is up

    def track(self, msg: Message) -> None:
        """Start the delivery bound of a capsule (idempotent per stanza id)."""
        if not msg["id"]:
            msg["id"] = self.xmpp.new_id()
        sid = str(msg["id"])
        if sid in self.pending or sid in self._given_up:
            return
        timer = asyncio.get_event_loop().call_later(self.timeout, self._expire, sid)
        self.pending[sid] = _Pending(msg, timer)
        if len(self.pending) > self.limit:
            self._give_up(next(iter(self.pending)),
                          f"the outbox holds {self.limit} unacknowledged capsules already")

    def _on_wire(self, stanza: StanzaBase) -> StanzaBase | None:
        if not isinstance(stanza, Message) or not st.has_capsule(stanza):
            return stanza
        if stanza["id"] in self._given_up:
            log.info("capsule %s was reported undelivered: not sent", stanza["id"])
            return None
        self.track(stanza)
        self.pending[stanza["id"]].out = True
        if self._ack_request is None:  # one request after a burst, not one per capsule
            self._ack_request = asyncio.get_event_loop().call_soon(self._request_ack)
        return stanza

    def _request_ack(self) -> None:
        self._ack_request = None
        sm = self.xmpp.plugin["xep_0198"]
        if self.xmpp.transport is not None and sm.enabled_out:
            sm.request_ack()

    def _on_acked(self, stanza: StanzaBase) -> None:
        if not isinstance(stanza, Message) or stanza["id"] not in self.pending:
            return
        sid, peer = str(stanza["id"]), str(stanza["to"].bare)
        self.pending.pop(sid).timer.cancel()
        self._remember(self._acked, sid, peer)
        self.xmpp.event("capsule_acked", Acked(sid, peer))

    def _down(self, _event: Any) -> None:
        """The stream is gone: capsules slixmpp still queued for it come back here (it would
        write them to the next connection before the login); the rest stays in its queue."""
        queue = self.xmpp.waiting_queue
        kept = []
        while not queue.empty():
            item = queue.get_nowait()
            queue.task_done()
            if isinstance(item[0], Message) and item[0]["id"] in self.pending:
                self.pending[item[0]["id"]].out = True
            else:
                kept.append(item)
        for item in kept:
            queue.put_nowait(item)

    def _resend(self, _event: Any) -> None:
        """Stream management is on (a new session, or a resumed one): send what went out or
        waited and xep_0198 does not track (it forgets a dead session's unacked stanzas)."""
        tracked = {id(stanza) for _seq, stanza in self.xmpp.plugin["xep_0198"].unacked_queue}
        unacked = [e.stanza for e in self.pending.values() if e.out and id(e.stanza) not in tracked]
        if unacked:
            log.info("sending %d unacknowledged capsules again", len(unacked))
        for msg in unacked:
            self.resent += 1
            self.xmpp.send(msg)

    def _on_bounce(self, msg: Message) -> None:
        """A capsule the server returned with an error (e.g. the contact's stream died)."""
        sid = str(msg["id"])
        why = f"returned by the server: {msg['error']['condition'] or 'error'}"
        if sid in self.pending:
            self._give_up(sid, why)
        elif sid in self._acked:
            self.report(Undelivered(why), msg, self._acked.pop(sid))

    def _expire(self, sid: str) -> None:
        self._give_up(sid, f"not acknowledged by the server within {self.timeout:g} s")

    def _give_up(self, sid: str, why: str) -> None:
        entry = self.pending.pop(sid)
        entry.timer.cancel()
        self._remember(self._given_up, sid, None)
        if self.xmpp.transport is None:  # no resumption, so slixmpp does not resend it either
            self.xmpp.plugin["xep_0198"].sm_id = None
        self.report(Undelivered(why), entry.stanza, str(entry.stanza["to"].bare))

    def _remember(self, ids: OrderedDict[str, Any], sid: str, value: Any) -> None:
        ids[sid] = value
        while len(ids) > 2 * self.limit:
            ids.popitem(last=False)
