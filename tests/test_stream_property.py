"""Property test, server-free (issue 9): random sequences of hostile stanzas (types,
timestamps, addressing, nesting, policies) never break the invariants: under require nothing
readable enters or leaves; nothing is delivered unverified; a fresh honest capsule from another
sender is still delivered afterwards."""

from __future__ import annotations

import asyncio
import datetime as dt
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s
from slixmpp.types import MessageTypes

from capsule import elements
from capsule.plugin import capsule_info
from capsule.testing.stream import Cast, Stream, message, seal_for

TYPES = ["chat", "normal", "headline", "groupchat", "error", ""]
ROOM = "lounge@rooms.capsule.test"
NOW = dt.datetime.now(dt.UTC)

stanza_spec = s.fixed_dictionaries({
    "kind": s.sampled_from(["plain", "capsule", "outgoing"]),
    "type": s.sampled_from(TYPES),
    "author": s.sampled_from(["alice", "mallory", "bob"]),
    "frm": s.sampled_from(["author", "other", "room"]),
    "addressees": s.sampled_from(["exact", "room", "extra", "none-of-us"]),
    "depth": s.sampled_from([0, 1, 40]),
    "child": s.sampled_from(["body", "subject", "html", "oob", "foreign-body", "receipt"]),
    "skew_days": s.sampled_from([0, -400, 3650]),
})
CHILDREN = {
    "body": "<body>readable</body>",
    "subject": "<subject>readable</subject>",
    "html": "<html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/xhtml'>"
            "readable</body></html>",
    "oob": "<x xmlns='jabber:x:oob'><url>readable</url></x>",
    "foreign-body": "<body xmlns='urn:example'>readable</body>",
    "receipt": "<request xmlns='urn:xmpp:receipts'/>",
}


def _element(xml: str, depth: int) -> ET.Element:
    el = ET.fromstring(f"<w xmlns='jabber:client'>{xml}</w>")[0]
    inner = el
    for _ in range(depth):
        inner = ET.SubElement(inner, "{urn:example}nest")
    return el


def _stanza(cast: Cast, spec: dict[str, object], bob_jid: str) -> str:
    author = cast[str(spec["author"])]
    child = CHILDREN[str(spec["child"])]
    mtype = str(spec["type"])
    frm = {"author": f"{author.jid}/x", "other": "eve@capsule.test/x", "room": ROOM}[str(spec["frm"])]
    if spec["kind"] == "plain":
        return f"<message from='{frm}' to='{bob_jid}/stream' type='{mtype or 'normal'}'>{child}</message>"
    bob = cast["bob"]
    addressees = {"exact": None, "room": [bob.jid, ROOM], "extra": [bob.jid, "carol@capsule.test"],
                  "none-of-us": ["carol@capsule.test"]}[str(spec["addressees"])]
    capsule_ = seal_for(author, [author, bob], [_element(child, int(str(spec["depth"])))],
                        addressees=addressees,
                        now=NOW + dt.timedelta(days=int(str(spec["skew_days"]))))
    return message(capsule_, frm, f"{bob_jid}/stream", mtype or "normal")


async def _scenario(cast: Cast, workdir: Path, policy: str, specs: list[dict[str, object]]) -> None:
    carol = cast["carol"]
    async with Stream.open(cast["bob"], workdir, cast.directory_of("alice", "carol"),
                           policy=policy) as bob:
        for spec in specs:
            if spec["kind"] == "outgoing":
                msg = bob.xmpp.make_message(mto=cast[str(spec["author"])].jid,
                                            mtype=typing.cast(MessageTypes, str(spec["type"]) or "normal"))
                msg.append(_element(CHILDREN[str(spec["child"])], 0))
                msg.send()
            else:
                bob.recv(_stanza(cast, spec, bob.me.jid))
            await bob.settle()
        honest = seal_for(carol, [carol, cast["bob"]], [_element("<body>honest</body>", 0)])
        bob.recv(message(honest, f"{carol.jid}/x", f"{bob.me.jid}/stream", mid="honest"))
        await bob.settle()
        delivered = bob.delivered() + bob.named("groupchat_message")
        for msg in delivered:
            assert capsule_info(msg) is not None or not elements.readable(msg.xml) or policy != "require"
            if capsule_info(msg) is None:  # unverified: never looks like a capsule's content
                assert msg.xml.find("{urn:capsule:0}capsule") is None
        assert [m["body"] for m in bob.delivered() if m["id"] == "honest"] == ["honest"]
        if policy == "require":
            for out in bob.sent():
                assert out.xml.find("{urn:capsule:0}capsule") is not None or not elements.readable(out.xml)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=s.sampled_from(["require", "prefer"]), specs=s.lists(stanza_spec, min_size=1, max_size=5))
def test_hostile_sequences_keep_the_invariants(stream_cast: Cast, tmp_path: Path, policy: str,
                                               specs: list[dict[str, object]]) -> None:
    asyncio.run(_scenario(stream_cast, tmp_path, policy, specs))
