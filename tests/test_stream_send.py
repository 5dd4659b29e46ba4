"""Sending, server-free (issue 9.2, 9.3): plaintext only on a definite "no certificates",
never to a pinned contact or a room; under require every readable message is sealed; rich
content (XHTML-IM, OOB) goes inside the capsule under any policy."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from slixmpp import JID, Message
from slixmpp.types import MessageTypes

from capsule import elements, sending
from capsule.enrollment import FirstFound
from capsule.errors import CapsuleError, CertificateLookupFailed
from capsule.testing.stream import Cast, Directory, Stream
from tests.streams import Wire, one_address, send_text, until

HTML = ("<html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/xhtml'>"
        "<p>secret <b>html</b></p></body></html>")
OOB = "<x xmlns='jabber:x:oob'><url>https://example.org/secret-file</url></x>"


def _messages(stream: Stream) -> list[Message]:
    return [s for s in stream.sent() if isinstance(s, Message)]


def _reasons(stream: Stream) -> list[str]:
    return [f.reason for f in stream.errors()]


async def _send_after_pep_answer(stream: Stream, to: str, answer: str | None) -> None:
    """Send a chat message to ``to``; answer the PEP look-up it causes with ``answer`` (None:
    never answer, so that it times out)."""
    stream.xmpp.send_message(mto=JID(to), mbody="sensitive", mtype="chat")
    for _ in range(2000):  # the look-up goes out from a task: a bounded wait for it
        await asyncio.sleep(0.005)
        iqs = [s for s in stream.sent() if s.name == "iq"]
        if iqs:
            if answer is not None:
                stream.recv(answer.format(id=iqs[0]["id"], to=stream.xmpp.boundjid, frm=to))
            break
    else:
        raise AssertionError("no PEP look-up was sent")
    await stream.settle()


PEP_ERROR = ("<iq type='error' id='{id}' from='{frm}' to='{to}'><error type='cancel'>"
             "<{cond} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
PEP_EMPTY = ("<iq type='result' id='{id}' from='{frm}' to='{to}'>"
             "<pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='urn:capsule:certs:0'/>"
             "</pubsub></iq>")


@pytest.mark.parametrize("answer", [None, PEP_ERROR.replace("{cond}", "service-unavailable"),
                                    PEP_ERROR.replace("{cond}", "remote-server-timeout")],
                         ids=["timeout", "service-unavailable", "remote-server-timeout"])
async def test_prefer_refuses_when_the_lookup_gives_no_definite_answer(
        stream_cast: Cast, tmp_path: Path, answer: str | None) -> None:
    async with Stream.open(stream_cast["bob"], tmp_path, None, fetch_timeout=0.3) as bob:
        await _send_after_pep_answer(bob, "nobody@capsule.test", answer)
        assert _messages(bob) == []
        assert _reasons(bob) == ["lookup-failed"]
        assert bob.named("capsule_plaintext_sent") == []


@pytest.mark.parametrize("answer", [PEP_ERROR.replace("{cond}", "item-not-found"),
                                    PEP_ERROR.replace("{cond}", "forbidden"), PEP_EMPTY],
                         ids=["item-not-found", "forbidden (Prosody)", "no-items"])
async def test_prefer_sends_plaintext_on_a_definite_none_and_tells_the_app(
        stream_cast: Cast, tmp_path: Path, answer: str) -> None:
    async with Stream.open(stream_cast["bob"], tmp_path, None, fetch_timeout=5) as bob:
        await _send_after_pep_answer(bob, "legacy@capsule.test", answer)
        [msg] = _messages(bob)
        assert msg["body"] == "sensitive" and _reasons(bob) == []
        [event] = bob.named("capsule_plaintext_sent")
        assert (event.peer, event.reason) == ("legacy@capsule.test", "no-certificate")


async def test_plaintext_let_out_once_is_never_another_messages(
        stream_cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Policy prefer clears one message for plaintext; if that message never comes back to be
    sent (a stream that died with it queued: slixmpp drops its queue), a later message, even
    at the same address (CPython reuses a freed object's), is sealed like any other."""
    dora, directory = stream_cast["dora"], stream_cast.directory_of("dora")
    directory.answers["legacy@capsule.test"] = None  # publishes nothing: prefer lets it out
    async with Stream.open(stream_cast["bob"], tmp_path, directory) as bob:
        send, messages = bob.xmpp.send, []

        def drop_the_cleared_message(stanza: Message, use_filters: bool = True) -> None:
            if isinstance(stanza, Message):
                messages.append(stanza)
                if len(messages) == 2:  # the app's send, then the sender's, cleared: lost
                    return
            send(stanza, use_filters)

        monkeypatch.setattr(bob.xmpp, "send", drop_the_cleared_message)
        monkeypatch.setattr(sending, "id", one_address, raising=False)
        bob.xmpp.send_message(mto=JID("legacy@capsule.test"), mbody="clear", mtype="chat")
        await bob.settle()
        assert len(messages) == 2 and _messages(bob) == []
        monkeypatch.setattr(bob.xmpp, "send", send)
        bob.xmpp.send_message(mto=JID(dora.jid), mbody="for dora only", mtype="chat")
        await bob.settle()
        [msg] = _messages(bob)
        assert msg["body"] != "for dora only" and msg.xml.find("{urn:capsule:0}capsule") is not None
        assert bob.named("capsule_plaintext_sent") == [] and _reasons(bob) == []



async def test_a_pinned_contact_never_gets_plaintext_again(stream_cast: Cast, tmp_path: Path) -> None:
    dora = stream_cast["dora"]  # revoked below: used by this test only
    directory = stream_cast.directory_of("dora")
    async with Stream.open(stream_cast["bob"], tmp_path, directory) as bob:
        bob.xmpp.send_message(mto=JID(dora.jid), mbody="first", mtype="chat")
        await bob.settle()
        [first] = _messages(bob)
        assert first.xml.find("{urn:capsule:0}capsule") is not None  # sealed, dora now pinned
        stream_cast.authority.revoke(jid=dora.jid)
        bob.capsule.trust.update_crl(stream_cast.authority.crl_path.read_bytes())
        directory.answers[dora.jid] = None  # and the server says she has nothing
        bob.xmpp.send_message(mto=JID(dora.jid), mbody="second", mtype="chat")
        await bob.settle()
        assert _messages(bob) == []
        assert _reasons(bob) == ["withdrawn"]


async def test_a_transparent_room_send_is_sealed_for_every_occupant_or_refused(
        stream_cast: Cast, tmp_path: Path) -> None:
    alice = stream_cast["alice"]
    directory = stream_cast.directory_of("alice", "bob")
    directory.answers["legacy@capsule.test"] = None  # a definite "none" for one occupant
    room = "lounge@rooms.capsule.test"
    async with Stream.open(stream_cast["bob"], tmp_path, directory) as bob:
        await bob.join(room, "bob", {"alice": f"{alice.jid}/x", "legacy": "legacy@capsule.test/y"})
        bob.xmpp.send_message(mto=JID(room), mbody="to the room", mtype="groupchat")
        await bob.settle()
        assert _messages(bob) == []
        assert _reasons(bob) == ["no-certificate"]


@pytest.mark.parametrize("mtype,payload", [
    ("headline", "<body>breaking news</body>"),
    ("chat", "<subject>only a subject</subject>"),
    ("normal", HTML),
    ("chat", OOB),
    ("error", "<body>an error with a body</body>"),
])
async def test_require_seals_every_readable_message(stream_cast: Cast, tmp_path: Path,
                                                    mtype: MessageTypes, payload: str) -> None:
    alice = stream_cast["alice"]
    async with Stream.open(stream_cast["bob"], tmp_path, stream_cast.directory_of("alice"),
                           policy="require") as bob:
        msg = bob.xmpp.make_message(mto=alice.jid, mtype=mtype)
        msg.append(elements_of(payload))
        msg.send()
        await bob.settle()
        [out] = _messages(bob)
        assert out.xml.find("{urn:capsule:0}capsule") is not None
        clear = [el for el in elements.content(out.xml) if elements.name(el)[1] != "body"]
        assert clear == [] and "news" not in str(out) and "secret" not in str(out)


def elements_of(xml: str) -> ET.Element:
    return ET.fromstring(f"<wrap xmlns='jabber:client'>{xml}</wrap>")[0]


@pytest.mark.parametrize("policy", ["prefer", "require"])
async def test_xhtml_and_oob_travel_inside_the_capsule(stream_cast: Cast, tmp_path: Path,
                                                      policy: str) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    directory = stream_cast.directory_of("alice", "bob")
    async with Stream.open(bob, tmp_path, directory, policy=policy) as b, \
            Stream.open(alice, tmp_path, directory, policy=policy) as a:
        msg = b.xmpp.make_message(mto=alice.jid, mbody="see attachment", mtype="chat")
        msg.append(elements_of(HTML))
        msg.append(elements_of(OOB))
        msg.send()
        await b.settle()
        assert b.relay(a) == 1
        await a.settle()
        [got] = a.delivered()
        assert got["body"] == "see attachment"
        assert got.xml.findtext("{jabber:x:oob}x/{jabber:x:oob}url") == "https://example.org/secret-file"
        assert got.xml.find("{http://jabber.org/protocol/xhtml-im}html") is not None


async def test_nothing_is_sent_when_the_source_fails(stream_cast: Cast, tmp_path: Path) -> None:
    """A fake source raising (e.g. the CA directory down) is a refusal, not "no certificate"."""
    directory = Directory({"carol@capsule.test": CapsuleError("down")})
    async with Stream.open(stream_cast["bob"], tmp_path, directory) as bob:
        bob.xmpp.send_message(mto=JID("carol@capsule.test"), mbody="x", mtype="chat")
        await bob.settle()
        assert _messages(bob) == [] and _reasons(bob) == ["error"]


async def test_policy_off_says_each_plaintext_send(stream_cast: Cast, tmp_path: Path) -> None:
    alice = stream_cast["alice"]
    async with Stream.open(stream_cast["bob"], tmp_path, stream_cast.directory_of("alice"),
                           policy="off") as bob:
        bob.xmpp.send_message(mto=JID(alice.jid), mbody="in clear on purpose", mtype="chat")
        bob.xmpp.send_message(mto=JID(alice.jid), mtype="chat", mbody="")  # nothing readable: no event
        await bob.settle()
        assert [m["body"] for m in _messages(bob)] == ["in clear on purpose", ""]
        [event] = bob.named("capsule_plaintext_sent")
        assert (event.peer, event.reason) == (alice.jid, "policy-off")


@pytest.mark.parametrize("pep,ca,outcome", [
    (CertificateLookupFailed("PEP down"), "bundle", "sealed"),  # the CA fallback still serves
    (CertificateLookupFailed("PEP down"), None, "lookup-failed"),  # no definite "none"
    (None, None, "plaintext"),  # both say so: prefer may send in clear
])
async def test_the_ca_fallback_keeps_failures_closed(stream_cast: Cast, tmp_path: Path,
                                                     pep: CapsuleError | None, ca: str | None,
                                                     outcome: str) -> None:
    alice = stream_cast["alice"]
    source = FirstFound(Directory({alice.jid: pep}),
                        Directory({alice.jid: alice.bundle if ca else None}))
    async with Stream.open(stream_cast["bob"], tmp_path, source) as bob:
        bob.xmpp.send_message(mto=JID(alice.jid), mbody="hi", mtype="chat")
        await bob.settle()
        sent = _messages(bob)
        if outcome == "sealed":
            assert len(sent) == 1 and sent[0].xml.find("{urn:capsule:0}capsule") is not None
        elif outcome == "plaintext":
            assert [m["body"] for m in sent] == ["hi"] and bob.named("capsule_plaintext_sent")
        else:
            assert sent == [] and _reasons(bob) == [outcome]


async def test_a_message_sent_as_the_app_stops_leaves_before_the_streams_end(
        stream_cast: Cast, tmp_path: Path) -> None:
    """``send_message`` then ``disconnect()`` at once: the capsule, sealed by a task, is
    written before the stream's end (the server drops what follows it)."""
    bob = stream_cast["bob"]
    async with stream_cast.pair(tmp_path) as (a, _b):
        wire = Wire(a)
        send_text(a, bob.jid, "said just before stopping")
        stopping = a.xmpp.disconnect(wait=10)
        await until(wire.ended)
        end = wire.written.index(a.xmpp.stream_footer)
        assert [data for data in wire.written[:end] if "urn:capsule" in data]
        a.recv(a.xmpp.stream_footer)  # the server ends its stream too
        await asyncio.wait_for(stopping, 20)
