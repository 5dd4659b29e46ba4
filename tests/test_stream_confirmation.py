"""What a confirmation proves (an outside review, issue 10), server-free: a receipt counts only
with the proof its reader made; ids are per contact and never reused while they could be
confused; a bounce counts only from the addressee, its server or the room; the app can hold a
confirmation until its async work is done; a capsule the app could not take comes again."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
from slixmpp import Message

from capsule import outbox, receipts
from capsule.replay import Handed, JournalItem
from capsule.testing.stream import Cast, Stream
from tests.streams import (
    V1,
    capsule_from,
    capsules_in,
    journal_writes,
    one_address,
    pair,
    receipt_back,
    receipts_in,
    record,
    until,
    v1_capsule_from,
    versions,
)

RECEIVED = "<received xmlns='urn:xmpp:receipts' id='{sid}'/>"


def test_the_proof_binds_the_message_key_the_id_and_the_addressee() -> None:
    key, other = bytes(32), bytes([1]) * 32
    mac = receipts.proof(key, "id-1", "bob@capsule.test")
    assert len(mac) == 32 and mac == receipts.proof(key, "id-1", "bob@capsule.test")
    assert len({mac, receipts.proof(other, "id-1", "bob@capsule.test"),
                receipts.proof(key, "id-2", "bob@capsule.test"),
                receipts.proof(key, "id-1", "carol@capsule.test"),
                receipts.proof(key, "id-1b", "ob@capsule.test")}) == 5  # no ambiguous framing


async def test_a_plain_clients_receipt_does_not_confirm_a_capsule(
        stream_cast: Cast, tmp_path: Path) -> None:
    """Bob's phone (any XEP-0184 client) answers the request; only Bob's Capsule, which read
    the capsule, can add the proof."""
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path) as (a, b):
        record(a, "capsule_delivered", "capsule_undelivered")
        out = await capsule_from(a, bob.jid, "secret order #1")
        sid, me = out["id"], a.xmpp.boundjid
        other = await capsule_from(a, bob.jid, "another capsule")
        b.recv(other)
        await b.settle()
        [other_receipt] = receipts_in(b.sent())
        wrong = other_receipt.xml.find("{urn:capsule:receipt:0}proof")
        assert wrong is not None
        phone = f"<message from='{bob.jid}/phone' to='{me}'>" + RECEIVED.format(sid=sid)
        for extra in ("", f"<proof xmlns='urn:capsule:receipt:0'>{wrong.text}</proof>",
                      "<proof xmlns='urn:capsule:receipt:0'>not base64!</proof>",
                      "<proof xmlns='urn:capsule:receipt:0'/>"):
            a.recv(phone + extra + "</message>")
        await a.settle()
        assert [d.stanza_id for d in a.named("capsule_delivered")] == []
        assert a.capsule.outbox.unproven_receipts == 4 and (bob.jid, sid) in a.capsule.outbox.pending
        await receipt_back(out, a, b)
        assert [d.stanza_id for d in a.named("capsule_delivered")] == [sid]


def _app_message(stream: Stream, to: str, body: str, mid: str) -> Message:
    msg = stream.xmpp.make_message(mto=to, mbody=body, mtype="chat")
    msg["id"] = mid
    return msg


async def test_ids_are_per_contact_and_a_reused_id_is_refused(
        stream_cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused also when the app's message has the reported capsule's id(): CPython gives a
    freed object's address to a later one (the outbox once took that message for the capsule
    and dropped it, unreported: this test failed in about a third of its runs)."""
    bob, carol = stream_cast["bob"], stream_cast["carol"]
    async with stream_cast.pair(tmp_path, "alice", "bob", "carol") as (a, b):
        record(a, "capsule_delivered", "capsule_undelivered")
        _app_message(a, bob.jid, "to bob", "same").send()
        _app_message(a, carol.jid, "to carol", "same").send()  # another contact: its own
        await a.settle()
        to_bob, to_carol = capsules_in(a.sent())
        assert {(bob.jid, "same"), (carol.jid, "same")} <= set(a.capsule.outbox.pending)
        _app_message(a, bob.jid, "to bob again", "same").send()  # still outstanding
        await a.settle()
        assert capsules_in(a.sent()) == []
        [refused] = a.errors()
        assert (refused.reason, refused.stanza_id, refused.peer) == ("reused-id", "same", bob.jid)
        await receipt_back(to_bob, a, b)
        assert [(d.peer, d.stanza_id) for d in a.named("capsule_delivered")] == [
            (bob.jid, "same")]  # carol's is still waiting for carol
        assert (carol.jid, "same") in a.capsule.outbox.pending
        monkeypatch.setattr(outbox, "id", one_address, raising=False)
        a.recv(f"<message from='{carol.jid}' to='{a.xmpp.boundjid}' type='error' id='same'>"
               f"<error type='cancel'><service-unavailable "
               f"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")
        await a.settle()
        assert [u.peer for u in a.named("capsule_undelivered")] == [carol.jid]
        _app_message(a, carol.jid, "to carol again", "same").send()  # reported: refused
        await a.settle()
        assert capsules_in(a.sent()) == []
        assert [(e.reason, e.peer) for e in a.errors()] == [
            ("reused-id", bob.jid), ("undelivered", carol.jid), ("reused-id", carol.jid)]
        assert len(a.named("capsule_undelivered")) == 1 and to_carol["id"] == "same"



def _bounce(frm: str, to: str, sid: str) -> str:
    return (f"<message from='{frm}' to='{to}' id='{sid}' type='error'>"
            f"<error type='cancel'><recipient-unavailable "
            f"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")


async def test_a_bounce_counts_only_from_the_addressee_its_server_or_the_room(
        stream_cast: Cast, tmp_path: Path) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    room = "room@muc.capsule.test"
    async with Stream.open(alice, tmp_path, stream_cast.directory_of("alice", "bob")) as a:
        record(a, "capsule_undelivered")
        me = a.xmpp.boundjid
        first = await capsule_from(a, bob.jid, "one")
        second = await capsule_from(a, bob.jid, "two")
        await a.join(room, "alice", {"bob": f"{bob.jid}/x"})
        in_room = await a.capsule.send_groupchat(room, "to the room")
        await a.settle()
        a.sent()
        for forger in ("mallory@capsule.test/x", "mallory@capsule.test", "evil.example",
                       room, f"{room}/bob"):
            a.recv(_bounce(forger, str(me), first["id"]))
        for forger in ("mallory@capsule.test", "capsule.test", "muc.capsule.test", bob.jid):
            a.recv(_bounce(forger, str(me), in_room))
        await a.settle()
        assert a.named("capsule_undelivered") == []
        assert a.capsule.outbox.foreign_bounces == 9
        a.recv(_bounce("capsule.test", str(me), first["id"]))  # bob's server
        a.recv(_bounce(f"{bob.jid}/phone", str(me), second["id"]))  # bob
        a.recv(_bounce(room, str(me), in_room))  # the room
        await a.settle()
        assert sorted((u.peer, u.stanza_id) for u in a.named("capsule_undelivered")) == sorted(
            [(bob.jid, first["id"]), (bob.jid, second["id"]), (room, in_room)])


async def test_an_async_handler_holds_the_confirmation_until_its_work_is_done(
        stream_cast: Cast, tmp_path: Path) -> None:
    """``hold``: no handed mark, no receipt until the app says its work is safe; work that
    failed leaves the capsule unconfirmed, and the sender's resend is delivered again."""
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path) as (a, b):
        holds: list[asyncio.Future[None]] = []

        async def handler(msg: Message) -> None:
            holds.append(b.capsule.hold(msg))  # before the first await
            await asyncio.sleep(0)

        b.xmpp.add_event_handler("capsule_message", handler)
        written: list[JournalItem] = []

        def spy(items: list[JournalItem]) -> None:
            written.extend(items)
            append(items)

        append = journal_writes(b, spy)
        kept = await capsule_from(a, bob.jid, "work done")
        failed = await capsule_from(a, bob.jid, "work failed")
        b.recv(kept)
        b.recv(failed)
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert len(holds) == 2 and receipts_in(b.sent()) == []
        assert not any(isinstance(i, Handed) for i in written)
        holds[1].set_exception(RuntimeError("the database was down"))
        holds[0].set_result(None)
        await b.settle()
        assert [r["receipt"] for r in receipts_in(b.sent())] == [kept["id"]]
        assert sum(isinstance(i, Handed) for i in written) == 1
        b.recv(failed)  # the sender's resend: delivered again, flagged
        await until(lambda: len(holds) == 3)  # held: the stream settles only once released
        assert [m["body"] for m in b.delivered()] == ["work done", "work failed", "work failed"]
        assert b.delivered()[-1].capsule_info.recovered  # type: ignore[attr-defined]
        holds[2].set_result(None)
        await b.settle()
        assert [r["receipt"] for r in receipts_in(b.sent())] == [failed["id"]]


async def test_a_capsule_whose_handed_mark_failed_is_delivered_again_on_a_resend(
        stream_cast: Cast, tmp_path: Path) -> None:
    """Not dropped as a duplicate until a restart: the very next copy goes to the app."""
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path) as (a, b):
        out = await capsule_from(a, bob.jid, "mark me")
        full = True

        def disk_full_for_marks(items: list[JournalItem]) -> None:
            if full and any(isinstance(i, Handed) for i in items):
                raise OSError(errno.ENOSPC, "No space left on device")
            append(items)

        append = journal_writes(b, disk_full_for_marks)
        b.recv(out)
        await b.settle()
        assert receipts_in(b.sent()) == [] and [e.reason for e in b.errors()] == ["storage"]
        full = False
        b.capsule.durable.persist()  # the disk is writable again
        b.recv(out)
        await b.settle()
        assert [m["body"] for m in b.delivered()] == ["mark me", "mark me"]
        assert [r["receipt"] for r in receipts_in(b.sent())] == [out["id"]]
        b.recv(out)
        await b.settle()
        assert len(b.delivered()) == 2 and b.capsule.duplicates == 1


async def test_a_v1_capsule_is_confirmed_by_its_proof_only(stream_cast: Cast,
                                                           tmp_path: Path) -> None:
    """The proof derives from the message key whatever the wire format."""
    async with pair(stream_cast, tmp_path) as (a, b):
        record(a, "capsule_delivered")
        out = await v1_capsule_from(a, b, "forward secret")
        assert versions([out]) == [V1] and out["request_receipt"]
        a.recv(f"<message from='{b.me.jid}/phone' to='{a.xmpp.boundjid}'>"
               + RECEIVED.format(sid=out["id"]) + "</message>")
        await a.settle()
        assert a.named("capsule_delivered") == [] and a.capsule.outbox.unproven_receipts == 1
        await receipt_back(out, a, b)
        assert [d.stanza_id for d in a.named("capsule_delivered")] == [out["id"]]
