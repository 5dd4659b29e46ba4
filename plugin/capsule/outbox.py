"""Sealed capsules kept until the contact confirms them (XEP-0184), else reported.

Every capsule that leaves is held here, keyed by (addressee's bare JID, stanza id): until the
server's stream management ack covers it (``capsule_acked``), and a one-to-one capsule further
until the contact's receipt with its proof (``capsule_delivered``, see capsule.receipts); a
room's capsule is done at the ack. A second capsule with an id still outstanding or reported
for that contact is refused (ReusedId). A bounce counts only from the addressee's bare JID or
its server (a room: the room's bare JID).

slixmpp itself resends its unacked stanzas when a stream is *resumed*; when resumption
fails (the server restarted) the session is new and slixmpp forgets them, so the outbox sends
again every capsule not yet confirmed, once stream management is on again: also those the
server had acked, since a server killed after its ack may have lost them. While no connection
is up, capsules wait here rather than in slixmpp's queues (which would write them into the next
connection before its login); one acked but not confirmed is sent once more halfway through
``receipt_timeout``. A capsule not acknowledged within ``timeout`` seconds, not confirmed
within ``receipt_timeout`` more, one the outbox has no room for, and one the server
returns with an error, are reported as ``capsule_undelivered`` and never sent again. A resent
capsule is the identical stanza: the receiver drops the copy as a duplicate and confirms it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
import xml.etree.ElementTree as ET
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slixmpp import JID, BaseXMPP, Message
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath, StanzaPath

from capsule import events, receipts
from capsule import stanza as st
from capsule.errors import ReusedId, Undelivered

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (the addressee's or room's bare JID, stanza id)


def key_of(msg: StanzaBase) -> Key:
    return str(msg["to"].bare), str(msg["id"])


@dataclass(frozen=True)
class Acked:
    """The payload of ``capsule_acked``: the server has taken this capsule."""

    stanza_id: str
    peer: str


@dataclass(frozen=True)
class Delivered:
    """The payload of ``capsule_delivered``: the contact's Capsule confirmed this capsule."""

    stanza_id: str
    peer: str


@dataclass(slots=True)
class _Pending:
    # the stanza while it is on its way; once the server acked it, only its XML: the stanza
    # object and its plugins' wrappers (half of its tracked objects, more for v0) are dropped,
    # since a bot whose contact is away holds up to `outbox_limit` capsules for
    # `receipt_timeout` seconds and every full collection of its process walks them
    stanza: Message | None
    timer: asyncio.TimerHandle
    xml: ET.Element  # the capsule's stanza, in any of its wrappers: the capsule's identity
    out: bool = False  # written to a stream or waiting for one: (re)sent on the next stream
    acked: bool = False  # by the server; a one-to-one capsule then waits for its receipt
    proof: bytes | None = None  # the receipt's expected proof (capsule.receipts.proof)
    confirmed: bool = False  # a type that gets a receipt (receipts.confirmed)

    def shelve(self) -> None:
        """Drop the stanza's wrappers (the server acked it): made again if it is sent again."""
        self.stanza = None

    def holds(self, msg: StanzaBase) -> bool:
        """Whether ``msg`` is this very capsule: any stanza of its XML (the app's own sent
        again, a copy wrapped anew to be sent again)."""
        return msg.xml is self.xml

    def message(self, xmpp: BaseXMPP) -> Message:
        """The stanza, wrapped again if shelved (to send once more or report)."""
        if self.stanza is None:
            self.stanza = Message(xmpp, self.xml)
        return self.stanza


class Outbox:
    """Capsules sent but not yet confirmed; resent on a new stream, reported on timeout."""

    def __init__(self, xmpp: BaseXMPP, timeout: float, limit: int,
                 report: Callable[[Undelivered, StanzaBase, str], Any],
                 receipt_timeout: float = 600):
        self.xmpp = xmpp
        self.timeout = timeout
        self.receipt_timeout = receipt_timeout
        self.limit = limit
        self.report = report
        self.pending: OrderedDict[Key, _Pending] = OrderedDict()
        # never to be sent again: the stanza given up, held weakly (its own resend is dropped;
        # its id() would be another stanza's once it is freed, and that one would go unsent);
        # its XML, which any wrapper of it shares (the app's own stanza, a copy from the shelf)
        self._given_up: OrderedDict[Key, weakref.ref[ET.Element]] = OrderedDict()
        self._acked: OrderedDict[Key, None] = OrderedDict()  # room capsules, to report bounces
        self._ack_request: asyncio.Handle | None = None
        # one request for the server's ack unanswered at a time: one asked meanwhile waits
        # for the answer (an answer covers everything sent before its request)
        self._asking = self._ask_again = False
        self.resent = 0
        self.unproven_receipts = 0  # receipts without the right proof (e.g. a plain client's)
        self.foreign_bounces = 0  # error bounces from neither the addressee nor its server
        # an "out" filter runs before xep_0198's "out_sync" one: a refused stanza is not counted
        xmpp.add_filter("out", self._on_wire)
        for event, handler in self._events():
            xmpp.add_event_handler(event, handler)
        receipts.register()
        xmpp.register_handler(Callback("capsule receipt", StanzaPath("message/receipt"),
                                       self._on_receipt))
        sm = xmpp.plugin["xep_0198"]
        xmpp.register_handler(Callback("capsule ack answer", MatchXPath(sm.stanza.Ack.tag_name()),
                                       self._answered, instream=True))
        if getattr(xmpp, "sessionstarted", False) and not sm.enabled_out:  # logged in already
            enable = sm.stanza.Enable(xmpp)
            enable["resume"] = sm.allow_resume
            enable.send()

    def _events(self) -> list[tuple[str, Callable[..., Any]]]:
        return [("stanza_acked", self._on_acked),
                ("sm_enabled", self._resend_all), ("session_resumed", self._resend_unacked),
                ("disconnected", self._down), ("message_error", self._on_bounce)]

    def close(self) -> None:
        self.xmpp.del_filter("out", self._on_wire)
        self.xmpp.remove_handler("capsule receipt")
        self.xmpp.remove_handler("capsule ack answer")
        for event, handler in self._events():
            self.xmpp.del_event_handler(event, handler)
        for entry in self.pending.values():
            entry.timer.cancel()
        if self._ack_request:
            self._ack_request.cancel()

    def send(self, msg: Message) -> None:
        """Send a sealed capsule; its delivery bound starts now, even while no stream is up.
        Raises ReusedId (nothing sent) for an id outstanding or reported for that contact."""
        self.track(msg)
        if self.xmpp.transport is not None:  # slixmpp holds it until the session is up
            self.xmpp.send(msg)
        elif key_of(msg) in self.pending:
            self.pending[key_of(msg)].out = True  # sent once a stream is up

    def track(self, msg: Message) -> None:
        """Start the delivery bound of a capsule (idempotent for the same stanza); ReusedId
        for another capsule with the id of one outstanding or reported for that contact."""
        if not msg["id"]:
            msg["id"] = self.xmpp.new_id()
        key = key_of(msg)
        entry = self.pending.get(key)
        if (entry is not None and entry.holds(msg)) or self._is_given_up(key, msg):
            return
        if entry is not None or key in self._given_up:
            raise ReusedId(f"stanza id {key[1]} to {key[0]} is "
                           f"{'still outstanding' if entry else 'reported undelivered'}: "
                           f"one receipt would stand for two capsules")
        receipts.request(msg)
        message_key = receipts.take_key(msg)
        proof = receipts.proof(message_key, key[1], key[0]) if message_key else None
        timer = asyncio.get_event_loop().call_later(self.timeout, self._expire, key)
        self.pending[key] = _Pending(msg, timer, msg.xml, proof=proof,
                                     confirmed=receipts.confirmed(msg))
        if len(self.pending) > self.limit:
            self._give_up(next(iter(self.pending)),
                          f"the outbox holds {self.limit} unacknowledged capsules already")

    def _on_wire(self, stanza: StanzaBase) -> StanzaBase | None:
        if not isinstance(stanza, Message) or not st.has_capsule(stanza):
            return stanza
        key = key_of(stanza)
        if self._is_given_up(key, stanza):
            log.info("capsule %s was reported undelivered: not sent", key[1])
            return None
        try:
            self.track(stanza)
        except ReusedId as exc:
            events.fail(self.xmpp, exc, stanza, key[0])
            return None
        self.pending[key].out = True
        if self._ack_request is None:  # one request after a burst, not one per capsule
            self._ack_request = asyncio.get_event_loop().call_soon(self._request_ack)
        return stanza

    def _request_ack(self) -> None:
        self._ack_request = None
        sm = self.xmpp.plugin["xep_0198"]
        if self.xmpp.transport is None or not sm.enabled_out:
            return
        if self._asking:
            self._ask_again = True
        else:
            self._asking, self._ask_again = True, False
            sm.request_ack()

    def _answered(self, _ack: StanzaBase) -> None:
        self._asking = False
        if self._ask_again and self._ack_request is None:
            self._ack_request = asyncio.get_event_loop().call_soon(self._request_ack)

    def _on_acked(self, stanza: StanzaBase) -> None:
        key = key_of(stanza)
        entry = self.pending.get(key) if isinstance(stanza, Message) else None
        if entry is None:
            return
        if entry.acked:  # a copy sent again, acked again
            entry.shelve()
            return
        peer, sid = key
        entry.timer.cancel()
        if entry.confirmed:  # now the contact's receipt
            entry.acked = True
            entry.shelve()
            entry.timer = asyncio.get_event_loop().call_later(self.receipt_timeout / 2,
                                                              self._nudge, key)
        else:
            del self.pending[key]
            self._remember(self._acked, key, None)
        self.xmpp.event("capsule_acked", Acked(sid, peer))

    def _on_receipt(self, receipt: StanzaBase) -> None:
        """A receipt counts only from the bare JID the capsule was addressed to, and only
        with the proof that its reader opened it (any client there may answer a request)."""
        peer, sid = str(receipt["from"].bare), str(receipt["receipt"])
        entry = self.pending.get((peer, sid))
        if entry is None or not entry.confirmed:
            log.debug("ignored a receipt from %s for %s: no such capsule to it", peer, sid)
            return
        if not isinstance(receipt, Message) or not receipts.proven(receipt, entry.proof):
            self.unproven_receipts += 1
            log.debug("ignored a receipt from %s for %s without its proof", receipt["from"], sid)
            return
        if not entry.acked:  # the server's ack is on its way; the receipt implies it
            self.xmpp.event("capsule_acked", Acked(sid, peer))
        del self.pending[(peer, sid)]
        entry.timer.cancel()
        self.xmpp.event("capsule_delivered", Delivered(sid, peer))

    def _down(self, _event: Any) -> None:
        """The stream is gone: capsules slixmpp still queued for it come back here (it would
        write them to the next connection before the login); the rest stays in its queue."""
        self._asking = self._ask_again = False  # no answer comes on a dead stream
        for msg in self._unqueue(lambda s: isinstance(s, Message) and key_of(s) in self.pending):
            self.pending[key_of(msg)].out = True

    def _unqueue(self, picked: Callable[[Any], bool]) -> list[Any]:
        """Take the stanzas ``picked`` chooses out of slixmpp's send queue (the rest stay, in
        their order)."""
        queue = self.xmpp.waiting_queue
        taken: list[Any] = []
        kept: list[Any] = []
        while not queue.empty():
            item = queue.get_nowait()
            queue.task_done()
            (taken if picked(item[0]) else kept).append(item)
        for item in kept:
            queue.put_nowait(item)
        return [stanza for stanza, _use_filters in taken]

    def _drop_given_up(self) -> None:
        """slixmpp resends what the server had not acked on a resumed stream past the filters
        (``_on_wire``): a capsule reported undelivered meanwhile (a copy sent halfway through
        the receipt bound, say) is taken back out, also from stream management's unacked
        queue, which counts what the server acks (everything the server had is out of it:
        the resumption's ack came first)."""
        sm = self.xmpp.plugin["xep_0198"]
        given_up = {id(stanza) for _seq, stanza in sm.unacked_queue
                    if isinstance(stanza, Message) and self._is_given_up(key_of(stanza), stanza)}
        if given_up:
            self._unqueue(lambda s: id(s) in given_up)
            sm.unacked_queue = deque(item for item in sm.unacked_queue
                                     if id(item[1]) not in given_up)
            log.info("not sending again %d capsules reported undelivered", len(given_up))

    def _resend_all(self, _event: Any) -> None:
        """A new session (the old one is lost, maybe with the server's memory): everything
        not confirmed goes again, also what that server had acked."""
        self._resend(acked_too=True)

    def _resend_unacked(self, _event: Any) -> None:
        """A resumed session: the server kept what it acked."""
        self._drop_given_up()
        self._resend(acked_too=False)

    def _resend(self, acked_too: bool) -> None:
        """Send what went out or waited and xep_0198 does not track (it forgets a dead
        session's unacked stanzas)."""
        self._asking = self._ask_again = False  # a request on the old stream is not answered
        tracked = {id(stanza.xml) for _seq, stanza in self.xmpp.plugin["xep_0198"].unacked_queue}
        again = [e.message(self.xmpp) for e in self.pending.values()
                 if e.out and id(e.xml) not in tracked and (acked_too or not e.acked)]
        if again:
            log.info("sending %d unconfirmed capsules again", len(again))
        for msg in again:
            self.resent += 1
            self.xmpp.send(msg)

    def _on_bounce(self, msg: Message) -> None:
        """A capsule returned with an error (e.g. the contact's stream died): believed only
        from the addressee's bare JID or its server's domain, a room's only from the room."""
        sid, frm = str(msg["id"]), msg["from"]
        why = f"returned by the server: {msg['error']['condition'] or 'error'}"
        key = (str(frm.bare), sid)
        if not frm.user and key not in self.pending:  # the addressee's server
            key = next((k for k, e in self.pending.items()
                        if k[1] == sid and e.confirmed
                        and JID(k[0]).domain == frm.domain), key)
        if key in self.pending:
            self._give_up(key, why)
        elif key in self._acked:
            del self._acked[key]
            self.report(Undelivered(why), msg, key[0])
        else:
            self.foreign_bounces += 1
            log.debug("ignored an error bounce from %s for %s: no such capsule to it", frm, sid)

    def _nudge(self, key: Key) -> None:
        """Halfway through the receipt bound, send once more: the copy, or its receipt, may
        have been lost past a server that stayed up (the contact's stream died, federation)."""
        entry = self.pending[key]
        entry.timer = asyncio.get_event_loop().call_later(self.receipt_timeout / 2,
                                                          self._expire, key)
        if self.xmpp.transport is not None and self.xmpp.plugin["xep_0198"].enabled_out:
            self.resent += 1
            self.xmpp.send(entry.message(self.xmpp))

    def _expire(self, key: Key) -> None:
        entry = self.pending[key]
        self._give_up(key, f"no receipt from {key[0]} within "
                           f"{self.receipt_timeout:g} s of the server's ack" if entry.acked else
                      f"not acknowledged by the server within {self.timeout:g} s")

    def _give_up(self, key: Key, why: str) -> None:
        entry = self.pending.pop(key)
        entry.timer.cancel()
        stanza = entry.message(self.xmpp)
        self._remember(self._given_up, key, weakref.ref(entry.xml))
        if self.xmpp.transport is None and not entry.acked:  # no resumption: slixmpp
            # would resend it (it holds what the server has not acked)
            self.xmpp.plugin["xep_0198"].sm_id = None
        self.report(Undelivered(why), stanza, key[0])

    def _is_given_up(self, key: Key, stanza: StanzaBase) -> bool:
        """Whether ``stanza`` is the very capsule reported undelivered under ``key``."""
        given_up = self._given_up.get(key)
        return given_up is not None and given_up() is stanza.xml

    def _remember(self, ids: OrderedDict[Key, Any], key: Key, value: Any) -> None:
        ids[key] = value
        while len(ids) > 2 * self.limit:
            ids.popitem(last=False)
