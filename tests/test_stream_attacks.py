"""What an attacker found against issue 9's fail-closed promises, server-free: each stanza is
one a hostile server or contact can send."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from slixmpp import Message

from capsule.testing.stream import Cast, Stream, message, seal_for

BOB = "bob@capsule.test"
PLAIN = ("<forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' "
         f"from='ceo@capsule.test/x' to='{BOB}/stream' type='chat'><body>PLAINTEXT order</body>"
         "</message></forwarded>")
DECOY = ("<x xmlns='urn:example:decoy'><forwarded xmlns='urn:xmpp:forward:0'>"
         "<message xmlns='jabber:client'><capsule xmlns='urn:capsule:0'/></message></forwarded></x>")
SEALED = ("<forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' "
          f"from='ceo@capsule.test/x' to='{BOB}/stream' type='chat'><capsule xmlns='urn:capsule:0'/>"
          "</message></forwarded>")


def body(text: str) -> ET.Element:
    el = ET.Element("{jabber:client}body")
    el.text = text
    return el


def carbon(inner: str, kind: str = "received") -> str:
    return (f"<message from='{BOB}' to='{BOB}/stream' type='chat' id='c'>"
            f"<{kind} xmlns='urn:xmpp:carbons:2'>{inner}</{kind}></message>")


@pytest.mark.parametrize("stanza", [
    carbon(DECOY + PLAIN),
    carbon(PLAIN + DECOY),
    carbon(SEALED + PLAIN),
    carbon(SEALED.replace("</message></forwarded>", "</message>" + PLAIN[PLAIN.index("<message"):])),
    carbon(SEALED)[:-len("</message>")] + carbon(PLAIN, "sent")[carbon(PLAIN, "sent").index("<sent"):],
], ids=["decoy-first", "decoy-after", "two-forwarded", "two-messages", "received-and-sent"])
async def test_require_judges_the_carbon_slixmpp_hands_the_app(
        stream_cast: Cast, tmp_path: Path, stanza: str) -> None:
    """F1: the readable check must see exactly the forwarded message slixmpp delivers (direct
    children); a decoy sealed message elsewhere, or several candidates, is refused."""
    async with Stream.open(stream_cast["bob"], tmp_path, stream_cast.directory_of(),
                           policy="require", carbons=True) as bob:
        seen: list[object] = []
        for event in ("carbon_received", "carbon_sent"):
            bob.xmpp.add_event_handler(event, seen.append)
        bob.recv(stanza)
        await bob.settle()
        assert seen == []
        assert [f.reason for f in bob.errors()] == ["policy"]


async def test_own_capsule_as_carbon_is_dropped_with_carbons_off(
        stream_cast: Cast, tmp_path: Path) -> None:
    """F3: carbons are off by default; a server reflecting our own capsule as a received
    carbon must not make it an incoming message."""
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    own = seal_for(bob, [bob, alice], [body("bob's own words to alice")])
    inner = message(own, f"{bob.jid}/other", alice.jid, "chat", mid="orig")
    inner = inner.replace("<message ", "<message xmlns='jabber:client' ", 1)
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice"),
                           policy="require") as b:
        for kind in ("received", "sent"):
            b.recv(carbon(f"<forwarded xmlns='urn:xmpp:forward:0'>{inner}</forwarded>", kind))
        await b.settle()
        assert b.delivered() == [] and b.named("capsule_message") == []
        assert b.named("capsule_carbon_sent") == []


EXTRAS = {
    "mam-result": "<result xmlns='urn:xmpp:mam:2' id='x'><forwarded xmlns='urn:xmpp:forward:0'>"
                  "<message xmlns='jabber:client' from='ceo@capsule.test' to='bob@capsule.test'>"
                  "<body>UNVERIFIED wire</body></message></forwarded></result>",
    "pep-event": "<event xmlns='http://jabber.org/protocol/pubsub#event'><items node='x'><item id='1'>"
                 "<body xmlns='jabber:client'>UNVERIFIED event</body></item></items></event>",
    "forwarded": "<forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client'>"
                 "<body>UNVERIFIED forwarded</body></message></forwarded>",
}
TEXT_EXTRAS = {
    "xep33-desc": "<addresses xmlns='http://jabber.org/protocol/address'><address type='ofrom' "
                  "jid='ceo@capsule.test' desc='UNVERIFIED desc'/></addresses>",
    "thread": "<thread>UNVERIFIED thread</thread>",
    "carbons-private": "<private xmlns='urn:xmpp:carbons:2'>UNVERIFIED private</private>",
    "chat-state-text": "<active xmlns='http://jabber.org/protocol/chatstates'>UNVERIFIED</active>",
}


@pytest.mark.parametrize("extra", list(EXTRAS.values()), ids=list(EXTRAS))
async def test_a_wrapper_beside_a_capsule_is_refused(stream_cast: Cast, tmp_path: Path,
                                                     extra: str) -> None:
    """F2: forwarded messages beside a sealed one would reach the app unverified."""
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    sealed = seal_for(alice, [alice, bob], [body("honest")])
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice"),
                           policy="require") as b:
        b.recv(message(sealed, f"{alice.jid}/x", f"{bob.jid}/stream", "chat", extra=extra))
        await b.settle()
        assert b.delivered() == [] and [f.reason for f in b.errors()] == ["malformed"]


@pytest.mark.parametrize("extra", list(TEXT_EXTRAS.values()), ids=list(TEXT_EXTRAS))
async def test_only_textless_routing_elements_come_from_outside_a_capsule(
        stream_cast: Cast, tmp_path: Path, extra: str) -> None:
    """F2: the app gets the verified content and, from outside, only routing, hints, receipts
    and chat states without text."""
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    sealed = seal_for(alice, [alice, bob], [body("honest")])
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice"),
                           policy="require") as b:
        b.recv(message(sealed, f"{alice.jid}/x", f"{bob.jid}/stream", "chat",
                       extra=extra + "<request xmlns='urn:xmpp:receipts'/>"))
        await b.settle()
        [got] = b.delivered()
        assert got["body"] == "honest" and "UNVERIFIED" not in str(got)
        assert got.xml.find("{urn:xmpp:receipts}request") is not None


ERROR = "<error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"


async def test_a_stripped_error_keeps_no_forwarded_content(stream_cast: Cast,
                                                            tmp_path: Path) -> None:
    """F2: under require an error bounce reaches the app without anything readable."""
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    sealed = seal_for(alice, [alice, bob], [body("x")])
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice"),
                           policy="require") as b:
        seen: list[Message] = []
        b.xmpp.add_event_handler("message_error", seen.append)
        b.recv(f"<message from='{alice.jid}/x' to='{bob.jid}/stream' type='error' id='e1'>"
               f"<body>clear body</body>{EXTRAS['mam-result']}{ERROR}</message>")
        b.recv(message(sealed, f"{alice.jid}/x", f"{bob.jid}/stream", "error",
                       extra=EXTRAS["mam-result"] + ERROR, mid="e2"))
        await b.settle()
        assert len(seen) == 2
        assert not any("UNVERIFIED" in str(m) or "clear body" in str(m) for m in seen)
        assert all(m.xml.find("{jabber:client}error") is not None for m in seen)


FWD = ("<forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='x@capsule.test' "
       "to='y@capsule.test'><body>SECRET-FWD</body></message></forwarded>")
OUT_EXTRAS = {
    "mam-result": f"<result xmlns='urn:xmpp:mam:2' id='1'>{FWD}</result>",
    "carbon-received": f"<received xmlns='urn:xmpp:carbons:2'>{FWD}</received>",
    "xep33-desc": "<addresses xmlns='http://jabber.org/protocol/address'><address type='to' "
                  "jid='y@capsule.test' desc='SECRET-DESC'/></addresses>",
    "thread": "<thread>SECRET-THREAD</thread>",
}


@pytest.mark.parametrize("extra", list(OUT_EXTRAS.values()), ids=list(OUT_EXTRAS))
async def test_nothing_readable_goes_out_beside_a_capsule(stream_cast: Cast, tmp_path: Path,
                                                          extra: str) -> None:
    """F5: text in an allow-listed wrapper is sealed, never sent in clear beside the capsule."""
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    async with Stream.open(bob, tmp_path, stream_cast.directory_of("alice"),
                           policy="require") as b:
        m = b.xmpp.make_message(mto=alice.jid, mbody="hello", mtype="chat")
        m.xml.append(ET.fromstring(extra))
        m.send()
        await b.settle()
        wire = "".join(str(s) for s in b.sent())
        assert "urn:capsule:0" in wire and "SECRET" not in wire
        assert b.errors() == [] and b.named("capsule_plaintext_sent") == []
