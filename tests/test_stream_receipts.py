"""End-to-end confirmation (XEP-0184), server-free: a receipt only once the capsule is on disk
and with the app, again for a resend; the sender counts one only from the addressee; a capsule
the server acked but nobody confirmed is sent again on a new session, then reported."""

from __future__ import annotations

import asyncio
import errno
import gc
import threading
from pathlib import Path

import pytest
from slixmpp import Message
from slixmpp.xmlstream import StanzaBase

from capsule import inbound
from capsule import stanza as st
from capsule.replay import Handed, JournalItem
from capsule.testing.stream import Cast, Stream
from capsule.trust import CertificateSource, CertPair
from tests.streams import (
    Wire,
    capsule_from,
    capsules_in,
    journal_writes,
    receipt_back,
    receipts_in,
    record,
    until,
)

SM = "urn:xmpp:sm:3"


async def _enable_sm(stream: Stream) -> None:
    """Stream management on a new session, the way the server answers ``<enable/>``."""
    sm = stream.xmpp.plugin["xep_0198"]
    enable = sm.stanza.Enable(stream.xmpp)
    enable["resume"] = True
    enable.send()
    await stream.settle()
    stream.sent()
    stream.recv(f"<enabled xmlns='{SM}' id='session-{id(enable)}' resume='true'/>")
    await stream.settle()


async def test_the_receiver_confirms_after_delivery_and_again_for_a_resend(
        stream_cast: Cast, tmp_path: Path) -> None:
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path) as (a, b):
        out = await capsule_from(a, bob.jid, "hello")
        written: list[list[JournalItem]] = []

        def spy(items: list[JournalItem]) -> None:
            assert not receipts_in(b.sent()), "a receipt before the journal write"
            written.append(items)
            append(items)

        append = journal_writes(b, spy)
        b.recv(out)
        await b.settle()
        [msg] = b.delivered()
        assert msg["body"] == "hello"
        info = msg.capsule_info  # type: ignore[attr-defined]
        # the entry, then (after the handlers ran) its handed mark, each on disk before the receipt
        assert [type(i).__name__ for items in written for i in items] == ["Entry", "Handed"]
        assert written[-1] == [Handed(info.sender, info.nid)]
        [receipt] = receipts_in(b.sent())
        assert receipt["receipt"] == out["id"] and receipt["to"] == a.xmpp.boundjid
        assert not st.has_capsule(receipt) and not receipt["body"]  # metadata only: the id
        assert receipt.xml.find("{urn:xmpp:hints}no-permanent-store") is not None  # not archived
        b.recv(out)  # the sender's resend (its receipt was lost)
        await b.settle()
        assert len(b.delivered()) == 1 and b.capsule.duplicates == 1 and b.errors() == []
        [again] = receipts_in(b.sent())
        assert again["receipt"] == out["id"]


async def test_a_receipt_counts_only_from_the_addressee_for_a_capsule_sent_to_it(
        stream_cast: Cast, tmp_path: Path) -> None:
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path) as (a, b):
        record(a, "capsule_acked", "capsule_delivered", "capsule_undelivered")
        out = await capsule_from(a, bob.jid, "for bob only")
        sid = out["id"]
        b.recv(out)
        await b.settle()
        [receipt] = receipts_in(b.sent())
        me = a.xmpp.boundjid
        proof = receipt.xml.find("{urn:capsule:receipt:0}proof")
        assert proof is not None and proof.text
        tail = f"<proof xmlns='urn:capsule:receipt:0'>{proof.text}</proof></message>"
        forged = [f"<message from='mallory@capsule.test/x' to='{me}'>"  # not bob
                  f"<received xmlns='urn:xmpp:receipts' id='{sid}'/>{tail}",
                  f"<message from='capsule.test' to='{me}'>"  # the server
                  f"<received xmlns='urn:xmpp:receipts' id='{sid}'/>{tail}",
                  f"<message from='{bob.jid}/phone' to='{me}'>"
                  f"<received xmlns='urn:xmpp:receipts' id='unknown-{sid}'/>{tail}",
                  f"<message from='{bob.jid}/phone' to='{me}'>"
                  f"<received xmlns='urn:xmpp:receipts'/>{tail}"]
        for stanza in forged:
            a.recv(stanza)
        await a.settle()
        assert a.named("capsule_delivered") == [] and (bob.jid, sid) in a.capsule.outbox.pending
        receipt["from"] = f"{bob.jid}/other-resource"
        a.recv(receipt)
        await a.settle()
        [delivered] = a.named("capsule_delivered")
        assert (delivered.stanza_id, delivered.peer) == (sid, bob.jid)
        assert [x.stanza_id for x in a.named("capsule_acked")] == [sid]  # implied by it
        assert (bob.jid, sid) not in a.capsule.outbox.pending
        a.recv(receipt)  # again
        await a.settle()
        assert len(a.named("capsule_delivered")) == 1 and a.named("capsule_undelivered") == []


async def test_acked_but_unconfirmed_is_sent_again_on_a_new_session_then_reported(
        stream_cast: Cast, tmp_path: Path) -> None:
    """The server acked it and died: only the contact's receipt tells it arrived. Sent again
    on the new session, once more halfway through the bound, then reported."""
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    async with Stream.open(alice, tmp_path, stream_cast.directory_of("bob"),
                           receipt_timeout=2) as a:
        record(a, "capsule_acked", "capsule_delivered", "capsule_undelivered")
        await _enable_sm(a)
        out = await capsule_from(a, bob.jid, "acked, then lost")
        a.recv(f"<a xmlns='{SM}' h='1'/>")
        await a.settle()
        assert [x.stanza_id for x in a.named("capsule_acked")] == [out["id"]]
        copies: list[Message] = []

        def grab() -> list[Message]:
            copies.extend(capsules_in(a.sent()))
            return copies

        await _enable_sm(a)  # a new session: the server restarted
        assert grab(), "not sent again on the new session"
        await until(lambda: a.named("capsule_undelivered"))
        assert len(grab()) == 2 and a.capsule.outbox.resent == 2  # new session, halfway
        assert all(c["id"] == out["id"] and str(c["capsule"]) == str(out["capsule"])
                   for c in copies)  # the very capsule: a duplicate for the receiver
        [failure] = a.named("capsule_undelivered")
        assert failure.stanza_id == out["id"] and failure.reason == "undelivered"
        assert "no receipt" in failure.message
        assert len(a.named("capsule_acked")) == 1  # the resends' acks are not news
        await _enable_sm(a)  # reported: never sent again
        assert capsules_in(a.sent()) == []
        a.recv(f"<message from='{bob.jid}/x' to='{a.xmpp.boundjid}'>"
               f"<received xmlns='urn:xmpp:receipts' id='{out['id']}'/></message>")
        await a.settle()
        assert a.named("capsule_delivered") == []


async def test_a_capsule_waiting_for_its_receipt_is_kept_as_its_xml(
        stream_cast: Cast, tmp_path: Path) -> None:
    """A bot whose contact is away holds up to ``outbox_limit`` capsules for ``receipt_timeout``
    seconds; as stanzas (some thirty objects each) every full collection of its process would
    walk them (README, "Scaling out"). Once the server acked one, only its XML is kept (the
    stanza object and its plugins' wrappers go), and it is still sent again as the very
    capsule, and confirmed by its receipt."""
    bob = stream_cast["bob"]
    count = 100
    async with stream_cast.pair(tmp_path, receipt_timeout=3) as (a, b):
        record(a, "capsule_delivered")
        await _enable_sm(a)
        out = await capsule_from(a, bob.jid, "the first")
        for i in range(count - 1):
            await capsule_from(a, bob.jid, f"number {i}")
        gc.collect()
        before = len(gc.get_objects())
        a.recv(f"<a xmlns='{SM}' h='{count}'/>")
        await a.settle()
        gc.collect()
        assert len(a.capsule.outbox.pending) == count
        assert before - len(gc.get_objects()) > 20 * count  # old code: as many as before
        copies: list[Message] = []

        def resent() -> bool:
            copies.extend(capsules_in(a.sent()))
            return len(copies) == count

        await until(resent)  # halfway through the bound: every one of them again
        [again] = [c for c in copies if c["id"] == out["id"]]
        assert str(again) == str(out).replace(f' from="{a.xmpp.boundjid}"', "")
        await receipt_back(out, a, b)
        assert [d.stanza_id for d in a.named("capsule_delivered")] == [out["id"]]
        assert len(a.capsule.outbox.pending) == count - 1


async def test_the_apps_own_stanza_sent_again_is_still_that_capsule_once_shelved(
        stream_cast: Cast, tmp_path: Path) -> None:
    """The outbox knows a capsule by its XML; once only that is kept, the app's own
    stanza sent again is the same capsule (sent, no ``reused-id``), and after the capsule was
    reported undelivered it is dropped."""
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path, receipt_timeout=1) as (a, _b):
        record(a, "capsule_undelivered")
        await _enable_sm(a)
        msg = a.xmpp.make_message(mto=bob.jid, mbody="mine", mtype="chat")
        msg["id"] = "app-1"
        msg.send()
        await a.settle()
        [out] = capsules_in(a.sent())
        a.recv(f"<a xmlns='{SM}' h='1'/>")
        await a.settle()
        msg.send()  # the app sends its (sealed) stanza once more
        await a.settle()
        assert [str(c) for c in capsules_in(a.sent())] == [str(out)] and a.errors() == []
        await until(lambda: a.named("capsule_undelivered"))
        a.sent()
        msg.send()  # reported undelivered: never sent again, and no second error
        await a.settle()
        assert capsules_in(a.sent()) == [] and [e.reason for e in a.errors()] == ["undelivered"]


async def test_a_capsule_reported_undelivered_is_not_sent_again_on_a_resumed_stream(
        stream_cast: Cast, tmp_path: Path) -> None:
    """slixmpp resends the stanzas the server has not acked on a resumed stream, past the
    plugin's filters: the copy sent halfway through the receipt bound, unacked when the
    capsule was reported, must not go again (README: reported capsules are never sent again),
    and the acks after it still count right."""
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path, receipt_timeout=1) as (a, _b):
        record(a, "capsule_acked", "capsule_undelivered")
        await _enable_sm(a)
        out = await capsule_from(a, bob.jid, "halfway again")
        a.recv(f"<a xmlns='{SM}' h='1'/>")
        await a.settle()
        await until(lambda: a.named("capsule_undelivered"))
        assert [c["id"] for c in capsules_in(a.sent())] == [out["id"]]  # the copy, unacked
        a.xmpp.event("disconnected", None)
        await a.settle()
        sm = a.xmpp.plugin["xep_0198"]
        resume = sm.stanza.Resume(a.xmpp)  # what slixmpp sends on the new connection
        resume["h"], resume["previd"] = sm.handled, "session-1"
        resume.send()
        await a.settle()
        a.recv(f"<resumed xmlns='{SM}' h='1' previd='session-1'/>")
        await a.settle()
        assert capsules_in(a.sent()) == []
        later = await capsule_from(a, bob.jid, "after the resumption")
        a.recv(f"<a xmlns='{SM}' h='2'/>")  # the server's count: this one, not the copy
        await a.settle()
        assert [x.stanza_id for x in a.named("capsule_acked")] == [out["id"], later["id"]]


async def test_rooms_get_no_receipt_request(stream_cast: Cast, tmp_path: Path) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    room = "room@muc.capsule.test"
    async with Stream.open(alice, tmp_path, stream_cast.directory_of("alice", "bob")) as a:
        await a.join(room, "alice", {"bob": f"{bob.jid}/x"})
        sid = await a.capsule.send_groupchat(room, "to the room")
        await a.settle()
        [out] = capsules_in(a.sent())
        assert out["id"] == sid and not out["request_receipt"]


async def test_a_capsule_whose_handed_mark_failed_is_delivered_again_after_a_restart(
        stream_cast: Cast, tmp_path: Path) -> None:
    """The app may have got it or not (a kill inside its handler looks the same): delivered
    once more after the restart, confirmed, and from then on a quiet duplicate."""
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    directory = stream_cast.directory_of("alice", "bob")
    async with Stream.open(alice, tmp_path, directory) as a:
        out = await capsule_from(a, bob.jid, "at least once here")
        async with Stream.open(bob, tmp_path, directory, storage_retry=60) as b:
            def disk_full_for_marks(items: list[JournalItem]) -> None:
                if any(isinstance(i, Handed) for i in items):
                    raise OSError(errno.ENOSPC, "No space left on device")
                append(items)

            append = journal_writes(b, disk_full_for_marks)
            b.recv(out)
            await b.settle()
            assert len(b.delivered()) == 1 and [e.reason for e in b.errors()] == ["storage"]
            assert not b.delivered()[0].capsule_info.recovered  # type: ignore[attr-defined]
            assert receipts_in(b.sent()) == []  # not confirmed: we cannot tell it was handled
        async with Stream.open(bob, tmp_path, directory, restart=True) as b:
            b.recv(out)  # the sender's resend, or the server routing it again
            await b.settle()
            [msg] = b.delivered()
            assert msg["body"] == "at least once here"
            assert msg.capsule_info.recovered  # type: ignore[attr-defined]  # maybe seen before
            assert [r["receipt"] for r in receipts_in(b.sent())] == [out["id"]]
            b.recv(out)
            await b.settle()
            assert len(b.delivered()) == 1 and b.capsule.duplicates == 1 and b.errors() == []
        async with Stream.open(bob, tmp_path, directory, restart=True) as b:
            b.recv(out)
            await b.settle()
            assert b.delivered() == [] and b.capsule.duplicates == 1 and b.errors() == []
            assert [r["receipt"] for r in receipts_in(b.sent())] == [out["id"]]


def _acks(sent: list[Message | StanzaBase]) -> list[int]:
    return [int(s.xml.get("h", -1)) for s in sent if s.xml.tag == f"{{{SM}}}a"]


async def test_a_request_is_answered_once_the_capsule_before_it_is_handled(
        stream_cast: Cast, tmp_path: Path) -> None:
    """The server asks right after a capsule: one answer that counts it (answering at once,
    then again unasked once handled, doubled the acks and, on ejabberd, its requests)."""
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path) as (a, b):
        await _enable_sm(b)
        b.recv(await capsule_from(a, bob.jid, "counted"))
        b.recv(f"<r xmlns='{SM}'/>")
        await b.settle()
        assert len(b.delivered()) == 1
        assert _acks(b.sent()) == [1]
        b.recv(f"<r xmlns='{SM}'/>")  # nothing new since: answered at once
        await b.settle()
        assert _acks(b.sent()) == [1]


class _Slow(CertificateSource):
    """A look-up that takes as long as the test says (a slow PEP service)."""

    def __init__(self, source: CertificateSource):
        self.source, self.answer = source, asyncio.Event()

    async def fetch(self, jid: str) -> CertPair | None:
        await self.answer.wait()
        return await self.source.fetch(jid)


async def test_a_request_about_a_capsule_still_opening_is_answered_in_time_then_again(
        stream_cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A capsule whose sender is still being looked up does not keep the server waiting past
    ANSWER_WITHIN (nor is it counted before it is handled); its count follows unasked."""
    monkeypatch.setattr(inbound, "ANSWER_WITHIN", 0.2)
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    directory = stream_cast.directory_of("alice", "bob")
    slow = _Slow(directory)
    async with Stream.open(alice, tmp_path, directory) as a, \
            Stream.open(bob, tmp_path, slow) as b:
        await _enable_sm(b)
        b.recv(await capsule_from(a, bob.jid, "looked up slowly"))
        b.recv(f"<r xmlns='{SM}'/>")
        await asyncio.sleep(0.1)
        assert _acks(b.sent()) == []
        await asyncio.sleep(0.3)
        assert _acks(b.sent()) == [0]  # in time, and never ahead of the app
        slow.answer.set()
        await b.settle()
        assert len(b.delivered()) == 1 and _acks(b.sent()) == [1]


async def test_one_request_for_the_servers_ack_is_outstanding_at_a_time(
        stream_cast: Cast, tmp_path: Path) -> None:
    """Capsules sent while a request is unanswered ask again once it is answered (the answer
    covers only what was sent before its request), not once per burst."""
    bob = stream_cast["bob"]
    async with Stream.open(stream_cast["alice"], tmp_path, stream_cast.directory_of("bob")) as a:
        record(a, "capsule_acked")
        await _enable_sm(a)

        def requests() -> int:
            return sum(s.xml.tag == f"{{{SM}}}r" for s in a.sent())

        await a.capsule.send(bob.jid, "first")
        await a.settle()
        assert requests() == 1
        for text in ("second", "third"):  # two bursts, the request still unanswered
            await a.capsule.send(bob.jid, text)
            await a.settle()
        assert requests() == 0
        a.recv(f"<a xmlns='{SM}' h='1'/>")
        await a.settle()
        assert requests() == 1  # for the second and third
        a.recv(f"<a xmlns='{SM}' h='3'/>")
        await a.settle()
        assert requests() == 0 and len(a.named("capsule_acked")) == 3


async def test_a_receipt_sent_as_the_app_stops_is_written_before_the_streams_end(
        stream_cast: Cast, tmp_path: Path) -> None:
    """What the cluster bench lost (2 to 31 receipts of a process's 550 or 1,100: its receiver
    process stopped once its own capsules were confirmed): a receipt queued just before the
    app's ``disconnect()``, on the server after the stream's end, so dropped. slixmpp wrote
    the end first since its queue was empty, the receipt still in xep_0115's async filter."""
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path) as (a, b):
        out = await capsule_from(a, bob.jid, "the last one")
        send, stopping = b.xmpp.send, list[asyncio.Future[None]]()

        def stop_right_after_a_receipt(data: StanzaBase | str, use_filters: bool = True) -> None:
            send(data, use_filters)
            if isinstance(data, Message) and data["receipt"] and not stopping:
                # the app, the next instant: slixmpp has taken the receipt from its queue
                asyncio.get_running_loop().call_soon(
                    lambda: stopping.append(b.xmpp.disconnect(wait=10)))

        b.xmpp.send = stop_right_after_a_receipt  # type: ignore[method-assign]
        wire = Wire(b)
        b.recv(out)
        await until(wire.ended)
        assert len(wire.receipts()) == 1 and wire.receipt_before_the_end(out["id"])
        b.recv(b.xmpp.stream_footer)  # the server ends its stream too
        await asyncio.wait_for(stopping[0], 20)


async def test_the_app_stopping_lets_the_receipts_in_hand_out_first(
        stream_cast: Cast, tmp_path: Path) -> None:
    """The app stops while a capsule it got is still being marked handed: its receipt, sent
    once the mark is on disk, still leaves before the stream's end."""
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path) as (a, b):
        out = await capsule_from(a, bob.jid, "the last one")
        marking, release = threading.Event(), threading.Event()

        def slow_marks(items: list[JournalItem]) -> None:
            if any(isinstance(i, Handed) for i in items):
                marking.set()
                release.wait(30)
            append(items)

        append = journal_writes(b, slow_marks)
        b.recv(out)
        await until(marking.is_set)
        assert len(b.delivered()) == 1
        wire = Wire(b)
        stopping = b.xmpp.disconnect(wait=10)
        for _ in range(50):  # what disconnect() writes at once is written now
            await asyncio.sleep(0)
        release.set()
        await until(wire.ended)
        assert wire.receipt_before_the_end(out["id"])
        b.recv(b.xmpp.stream_footer)
        await asyncio.wait_for(stopping, 20)


async def test_a_capsule_the_app_still_holds_does_not_keep_the_stream_open(
        stream_cast: Cast, tmp_path: Path) -> None:
    """``disconnect(wait)`` waits for receipts at most ``wait`` seconds more."""
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path) as (a, b):
        out = await capsule_from(a, bob.jid, "never done with")
        held: list[asyncio.Future[None]] = []
        b.xmpp.add_event_handler("capsule_message", lambda msg: held.append(b.capsule.hold(msg)))
        b.recv(out)
        await until(lambda: b.delivered())
        wire = Wire(b)
        stopping = b.xmpp.disconnect(wait=0.2)
        await until(wire.ended)
        assert wire.receipts() == []
        b.recv(b.xmpp.stream_footer)
        await asyncio.wait_for(stopping, 20)
        held[0].set_exception(RuntimeError("the app stopped"))  # not confirmed: comes again
