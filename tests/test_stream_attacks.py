"""What an attacker found against issue 9's fail-closed promises, server-free: each stanza is
one a hostile server or contact can send."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

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
