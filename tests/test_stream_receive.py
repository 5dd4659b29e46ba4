"""Receiving, server-free (issue 9.3, 9.5, 9.8 limits, 9.9): nothing readable enters under
require, whatever the type; envelopes are addressed exactly; only protected content comes from
the envelope and server metadata only from the outer stanza of an entitled source."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import cast

import pytest
from slixmpp import JID, Message
from slixmpp.plugins.base import PluginManager

from capsule import elements
from capsule.errors import PolicyViolation
from capsule.plugin import capsule_info
from capsule.testing.stream import Cast, Stream, message, seal_for

ROOM = "lounge@rooms.capsule.test"
EVE = "from='eve@capsule.test/x' to='bob@capsule.test/stream'"


def body(text: str, ns: str = "jabber:client") -> ET.Element:
    el = ET.Element(f"{{{ns}}}body")
    el.text = text
    return el


def _reasons(stream: Stream) -> list[str]:
    return [f.reason for f in stream.errors()]


@pytest.mark.parametrize("stanza", [
    f"<message {EVE} type='headline'><body>buy now</body></message>",
    f"<message {EVE}><subject>only a subject</subject></message>",
    f"<message {EVE} type='chat'>"
    "<html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/xhtml'>hi</body></html></message>",
    f"<message {EVE} type='chat'>"
    "<x xmlns='jabber:x:oob'><url>https://evil.example/</url></x></message>",
    f"<message from='{ROOM}/eve' to='bob@capsule.test/stream' type='groupchat'><body>hi all</body></message>",
], ids=["headline", "subject-only", "xhtml-only", "oob-only", "groupchat-occupant"])
async def test_require_refuses_readable_plaintext_of_every_type(
        stream_cast: Cast, tmp_path: Path, stanza: str) -> None:
    async with Stream.open(stream_cast["bob"], tmp_path, stream_cast.directory_of(),
                           policy="require") as bob:
        bob.recv(stanza)
        await bob.settle()
        assert bob.delivered() == [] and bob.named("groupchat_message") == []
        assert _reasons(bob) == ["policy"]


@pytest.mark.parametrize("stanza", [
    f"<message {EVE} type='error'><body>hello in clear</body>"
    "<error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
    "</error></message>",
    f"<message from='{ROOM}' to='bob@capsule.test/stream' type='groupchat'>"
    f"<body>hello in clear</body><subject>hello in clear</subject></message>",
], ids=["error", "room-itself"])
async def test_require_withholds_the_content_of_what_must_still_be_routed(
        stream_cast: Cast, tmp_path: Path, stanza: str) -> None:
    async with Stream.open(stream_cast["bob"], tmp_path, stream_cast.directory_of(),
                           policy="require") as bob:
        bob.recv(stanza)
        await bob.settle()
        assert _reasons(bob) == ["policy"]
        for msg in bob.delivered() + bob.named("groupchat_message"):
            assert "hello in clear" not in str(msg) and not elements.readable(msg.xml)


async def test_a_capsule_sent_as_headline_is_opened_not_passed_as_fallback(
        stream_cast: Cast, tmp_path: Path) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    capsule_ = seal_for(alice, [alice, bob], [body("headline secret")])
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice"),
                           policy="require") as b:
        b.recv(message(capsule_, f"{alice.jid}/x", f"{bob.jid}/stream", "headline"))
        await b.settle()
        [msg] = b.delivered()
        assert msg["body"] == "headline secret" and capsule_info(msg) is not None
        assert msg["type"] == "headline"


@pytest.mark.parametrize("addressees,keyed,mtype,reason", [
    # sealed for a room, delivered as a 1:1 chat
    (["bob@capsule.test", ROOM], ["alice", "bob"], "chat", "envelope-mismatch"),
    # keyed for carol too, but the envelope does not name her
    (["bob@capsule.test"], ["alice", "bob", "carol"], "chat", "envelope-mismatch"),
    # names carol, who holds no key
    (["bob@capsule.test", "carol@capsule.test"], ["alice", "bob"], "normal", "envelope-mismatch"),
])
async def test_envelope_addressees_must_be_exactly_the_keyed_recipients(
        stream_cast: Cast, tmp_path: Path, addressees: list[str], keyed: list[str], mtype: str,
        reason: str) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    capsule_ = seal_for(alice, [stream_cast[n] for n in keyed], [body("x")], addressees=addressees)
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice")) as b:
        b.recv(message(capsule_, f"{alice.jid}/x", f"{bob.jid}/stream", mtype))
        await b.settle()
        assert b.delivered() == [] and _reasons(b) == [reason]


async def test_our_own_capsule_is_accepted_only_as_a_carbon(stream_cast: Cast, tmp_path: Path) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    # sent from bob's phone to alice and (a note to self) bob: exactly addressed, so only where
    # it comes from can tell a reflection from a carbon
    capsule_ = seal_for(bob, [bob, alice], [body("from bob's phone")],
                        addressees=[alice.jid, bob.jid])
    stanza = message(capsule_, f"{bob.jid}/phone", f"{alice.jid}", "chat")
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice"), carbons=True) as b:
        b.recv(stanza.replace(f"to='{alice.jid}'", f"to='{bob.jid}/stream'"))  # reflected live
        await b.settle()
        assert b.delivered() == [] and _reasons(b) == ["envelope-mismatch"]
        inner = stanza.replace("<message ", "<message xmlns='jabber:client' ", 1)
        b.recv(f"<message from='{bob.jid}' to='{bob.jid}/stream' type='chat'>"
               f"<sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
               f"{inner}</forwarded></sent></message>")
        await b.settle()
        [sent] = b.named("capsule_carbon_sent")
        assert sent["body"] == "from bob's phone"


async def test_forged_server_metadata_inside_the_envelope_never_reaches_the_app(
        stream_cast: Cast, tmp_path: Path) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    forged = [body("hi"),
              ET.fromstring("<stanza-id xmlns='urn:xmpp:sid:0' by='bob@capsule.test' id='FAKE-ID'/>"),
              ET.fromstring("<delay xmlns='urn:xmpp:delay' from='capsule.test' "
                            "stamp='2001-01-01T00:00:00Z'/>")]
    capsule_ = seal_for(alice, [alice, bob], forged)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    outer = (f"<delay xmlns='urn:xmpp:delay' from='capsule.test' stamp='{now}'>"
             "Offline Storage</delay>"
             "<delay xmlns='urn:xmpp:delay' from='capsule.test' stamp='2099-01-01T00:00:00Z'/>"
             "<stanza-id xmlns='urn:xmpp:sid:0' by='bob@capsule.test' id='REAL-ID'/>"
             "<stanza-id xmlns='urn:xmpp:sid:0' by='alice@capsule.test' id='ALICE-SAYS'/>"
             "<delay xmlns='urn:xmpp:delay' from='alice@capsule.test/x' "
             "stamp='2000-01-01T00:00:00Z'/>")
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice")) as b:
        b.recv(message(capsule_, f"{alice.jid}/x", f"{bob.jid}/stream", extra=outer))
        await b.settle()
        [msg] = b.delivered()
        ids = [el.get("id") for el in msg.xml.iter("{urn:xmpp:sid:0}stanza-id")]
        stamps = [el.get("stamp") for el in msg.xml.iter("{urn:xmpp:delay}delay")]
        assert ids == ["REAL-ID"] and stamps == [now]  # a future delay is not believed (F4)
        assert msg["body"] == "hi"


@pytest.mark.parametrize("content,reason", [
    ([body("hidden", ns="urn:example:other")], "uninterpretable"),
    ([ET.fromstring("<stanza-id xmlns='urn:xmpp:sid:0' by='x' id='y'/>")], "uninterpretable"),
    ([], "uninterpretable"),
], ids=["body-outside-jabber-client", "only-metadata", "empty"])
async def test_an_envelope_the_receiver_cannot_read_is_refused(
        stream_cast: Cast, tmp_path: Path, content: list[ET.Element], reason: str) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice")) as b:
        b.recv(message(seal_for(alice, [alice, bob], content), f"{alice.jid}/x", f"{bob.jid}/stream"))
        await b.settle()
        assert b.delivered() == [] and _reasons(b) == [reason]


@pytest.mark.parametrize("depth", [40, 100_000])
async def test_a_deeply_nested_signed_envelope_is_refused(stream_cast: Cast, tmp_path: Path,
                                                         depth: int) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    nested = "<b>" * depth + "</b>" * depth
    raw = (f"<envelope xmlns='urn:xmpp:sce:1'><content><body xmlns='jabber:client'>x</body>"
           f"<deep xmlns='urn:example'>{nested}</deep></content><time stamp='2026-01-01T00:00:00Z'/>"
           f"<to jid='{bob.jid}'/><from jid='{alice.jid}'/></envelope>").encode()
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice")) as b:
        b.recv(message(seal_for(alice, [alice, bob], raw), f"{alice.jid}/x", f"{bob.jid}/stream"))
        await b.settle()
        assert b.delivered() == [] and _reasons(b) == ["malformed"]


async def test_an_oversized_envelope_is_refused(stream_cast: Cast, tmp_path: Path) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice"),
                           max_envelope_bytes=4096) as b:
        b.recv(message(seal_for(alice, [alice, bob], [body("x" * 5000)]), f"{alice.jid}/x",
                       f"{bob.jid}/stream"))
        await b.settle()
        assert b.delivered() == [] and _reasons(b) == ["malformed"]


async def test_a_bot_without_rooms_loads_no_muc_and_refuses_group_chat_both_ways(
        stream_cast: Cast, tmp_path: Path) -> None:
    """``rooms=False`` (a fleet's bots that join no room: nine fewer handlers per stanza) must
    not turn group chat into a path around the policy: refused, never let out or in clear."""
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    capsule_ = seal_for(alice, [alice, bob], [body("to the room")],
                        addressees=[bob.jid, ROOM])
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice"),
                           rooms=False) as b:
        assert not cast(PluginManager, b.xmpp.plugin).enabled("xep_0045")
        b.recv(message(capsule_, f"{ROOM}/alice", f"{bob.jid}/stream", "groupchat"))
        await b.settle()
        assert b.delivered() == [] and b.named("groupchat_message") == []
        assert _reasons(b) == ["envelope-mismatch"]
        with pytest.raises(PolicyViolation, match="rooms=False"):
            await b.capsule.send_groupchat(ROOM, "sealed for the room?")
        with pytest.raises(PolicyViolation, match="rooms=False"):  # the explicit API too
            await b.capsule.seal(b.xmpp.make_message(mto=JID(ROOM), mbody="x"),
                                 [alice.jid], room=ROOM)
        b.xmpp.send_message(mto=JID(ROOM), mbody="in clear?", mtype="groupchat")
        await b.settle()
        assert [s for s in b.sent() if isinstance(s, Message)] == []
        assert _reasons(b) == ["envelope-mismatch", "policy"]
