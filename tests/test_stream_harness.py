"""The server-free harness itself: two in-process bots exchange a capsule through it."""

from __future__ import annotations

from pathlib import Path

from slixmpp import JID

from capsule.plugin import capsule_info
from capsule.testing.stream import Cast, Stream


async def test_a_capsule_from_one_stream_opens_in_another(stream_cast: Cast, tmp_path: Path) -> None:
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    directory = stream_cast.directory_of("alice", "bob")
    async with Stream.open(alice, tmp_path, directory) as a, Stream.open(bob, tmp_path, directory) as b:
        a.xmpp.send_message(mto=JID(bob.jid), mbody="hello bob", mtype="chat")
        await a.settle()
        [out] = a.sent()
        assert "hello bob" not in str(out) and out.xml.find("{urn:capsule:0}capsule") is not None
        out["from"] = a.xmpp.boundjid
        b.recv(out)
        await b.settle()
        [msg] = b.delivered()
        assert msg["body"] == "hello bob" and capsule_info(msg) is not None
        assert b.errors() == []
