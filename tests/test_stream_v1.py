"""Wire format v1 in the plugin, server-free: v1 whenever every recipient has valid session
keys, v0 otherwise (or refused under forward_secrecy='require'); v0 and v1 peers talk; hostile
session records are ignored; a capsule whose session key was destroyed never opens again."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID, Message

from capsule import algorithms as alg
from capsule import namespaces as ns
from capsule import sessions, v1, wire
from capsule.plugin import capsule_info
from capsule.testing.stream import Cast, Stream

V0, V1 = f"{{{ns.NAMESPACE}}}capsule", f"{{{ns.V1_NAMESPACE}}}capsule"


def _messages(stream: Stream) -> list[Message]:
    return [s for s in stream.sent() if isinstance(s, Message)]


def _versions(msgs: list[Message]) -> list[str]:
    return [child.tag for m in msgs for child in m.xml if child.tag in (V0, V1)]


async def _introduce(sender: Stream, peer: Stream) -> None:
    """What the sender would read from the peer's PEP session node."""
    contact = await sender.capsule.contact(peer.me.jid)
    now = int(time.time())
    assert sender.capsule.keyring.learn(peer.me.jid, contact.sign,
                                        peer.capsule.store.current_sessions(now)[:1], now)


@asynccontextmanager
async def _pair(cast: Cast, where: Path, other: str = "bob", **config: Any
                ) -> AsyncIterator[tuple[Stream, Stream]]:
    """alice and ``other`` on two streams, each knowing both certificates, same ``config``."""
    names = ("alice", "bob", other)
    async with Stream.open(cast["alice"], where / "a", cast.directory_of(*names), **config) as a, \
            Stream.open(cast[other], where / "b", cast.directory_of(*names), **config) as b:
        yield a, b


def _send(a: Stream, to: str, text: str) -> None:
    a.xmpp.send_message(mto=JID(to), mbody=text, mtype="chat")


def _deliver(a: Stream, msg: Message, b: Stream) -> None:
    """What the server does with a sent stanza: stamp the sender's full JID, hand it over."""
    msg["from"] = a.xmpp.boundjid
    b.recv(msg)


def _start(stream: Stream) -> None:
    """A login's session key; our node as if read back (publishing needs a server)."""
    now = int(time.time())
    stream.capsule.keyring.rotate(now, force=True)
    stream.capsule.keyring.learn(stream.me.jid, stream.capsule.own_sign,
                                 stream.capsule.store.current_sessions(now)[:1], now)


async def test_v1_when_the_recipient_has_session_keys_and_both_sides_read_it(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with _pair(stream_cast, tmp_path, policy="require") as (a, b):
        _start(a)
        _start(b)
        await _introduce(a, b)
        _send(a, b.me.jid, "forward secret")
        await a.settle()
        [sent] = _messages(a)
        assert _versions([sent]) == [V1]
        assert "forward secret" not in str(sent)
        a_copy = Message(xml=sent.xml)
        _deliver(a, sent, b)
        await b.settle()
        [got] = b.delivered()
        assert got["body"] == "forward secret" and capsule_info(got) is not None
        # the sender's own copy (her archive) opens with her own session key
        a_copy["from"] = a.xmpp.boundjid
        mine = await a.capsule.open(a_copy, replay_check=False, origin="archive")
        assert mine["body"] == "forward secret"


async def test_v0_to_a_peer_without_session_keys_and_v1_peers_open_v0(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with _pair(stream_cast, tmp_path, policy="require") as (a, b):
        _start(a)  # alice is v1-capable; bob publishes no session keys (an older Capsule)
        contact = await a.capsule.contact(b.me.jid)
        assert a.capsule.keyring.learn(b.me.jid, contact.sign, [], int(time.time())) == []
        _send(a, b.me.jid, "still sealed")
        await a.settle()
        [sent] = _messages(a)
        assert _versions([sent]) == [V0]
        _deliver(a, sent, b)
        await b.settle()
        assert [m["body"] for m in b.delivered()] == ["still sealed"]


async def test_forward_secrecy_required_refuses_v0_both_ways(stream_cast: Cast,
                                                             tmp_path: Path) -> None:
    async with _pair(stream_cast, tmp_path, forward_secrecy="require") as (a, b):
        _start(a)
        _send(a, b.me.jid, "needs fs")  # bob: no record
        await a.settle()
        assert _messages(a) == []
        assert [f.reason for f in a.errors()] == ["no-forward-secrecy"]
        a.capsule.sender.options = dataclasses.replace(  # alice sends v0 after all...
            a.capsule.sender.options, forward_secrecy="prefer")
        _send(a, b.me.jid, "needs fs")
        await a.settle()
        [sent] = _messages(a)
        assert _versions([sent]) == [V0]
        _deliver(a, sent, b)  # ...and bob, who requires forward secrecy, refuses it
        await b.settle()
        assert b.delivered() == [] and [f.reason for f in b.errors()] == ["no-forward-secrecy"]


@pytest.mark.parametrize("attack", ["signed-by-another", "another-jids-record", "expired"])
async def test_hostile_session_records_give_no_v1(stream_cast: Cast, tmp_path: Path,
                                                  attack: str) -> None:
    async with _pair(stream_cast, tmp_path, "carol", forward_secrecy="require") as (a, c):
        _start(a)
        _start(c)
        now = int(time.time())
        carol_record = c.capsule.store.current_sessions(now)[0]
        bob_sign = (await a.capsule.contact("bob@capsule.test")).sign
        if attack == "expired":
            key = c.capsule.store.data.sessions[0]
            records = [sessions.make_record("bob@capsule.test", bob_sign.fingerprint,
                                            stream_cast["bob"].signing_key, key.private,
                                            now - 3 * 86400)]
        else:  # carol's own record on bob's node, or one carol signed naming bob's cert
            records = [carol_record if attack == "another-jids-record" else
                       sessions.make_record("bob@capsule.test", bob_sign.fingerprint,
                                            stream_cast["carol"].signing_key,
                                            c.capsule.store.data.sessions[0].private, now)]
        assert a.capsule.keyring.learn("bob@capsule.test", bob_sign, records, now) == []
        _send(a, "bob@capsule.test", "for bob only")
        await a.settle()
        assert _messages(a) == [] and [f.reason for f in a.errors()] == ["no-forward-secrecy"]


async def test_after_retention_the_archived_capsule_is_session_expired(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with _pair(stream_cast, tmp_path) as (a, b):
        _start(a)
        _start(b)
        await _introduce(a, b)
        _send(a, b.me.jid, "gone after retention")
        await a.settle()
        [archived] = _messages(a)
        archived["from"] = a.xmpp.boundjid
        later = int(time.time()) + alg.SESSION_LIFETIME_S + alg.SESSION_RETENTION_S
        b.capsule.keyring.rotate(later)  # destroys the key; the profile file is rewritten
        element = wire.find(archived.xml)
        assert element is not None and element.tag == V1
        assert b.capsule.store.session_keys().keys().isdisjoint(
            k.sid for k in wire.parse(element).header.keys if isinstance(k, v1.KeyEntry))
        b.recv(archived)
        await b.settle()
        assert b.delivered() == [] and [f.reason for f in b.errors()] == ["session-expired"]


async def test_every_device_of_the_recipient_and_of_the_sender_reads_a_v1_capsule(
        stream_cast: Cast, tmp_path: Path) -> None:
    """Two devices of bob, each with its own session key (two copies of the profile), and a
    second device of alice: one capsule, wrapped to all of their published records."""
    names = ("alice", "bob")
    source = stream_cast.directory_of(*names)
    async with _pair(stream_cast, tmp_path) as (a, phone), \
            Stream.open(stream_cast["bob"], tmp_path / "t", source, resource="tablet") as tablet, \
            Stream.open(stream_cast["alice"], tmp_path / "l", source, resource="laptop") as laptop:
        for device in (a, phone, tablet, laptop):
            _start(device)
        now = int(time.time())
        bob_sign = (await a.capsule.contact(phone.me.jid)).sign
        published = [d.capsule.store.current_sessions(now)[0] for d in (phone, tablet)]
        assert published[0] != published[1]
        assert len(a.capsule.keyring.learn(phone.me.jid, bob_sign, published, now)) == 2
        own = [d.capsule.store.current_sessions(now)[0] for d in (a, laptop)]
        a.capsule.keyring.learn(a.me.jid, a.capsule.own_sign, own, now)
        _send(a, phone.me.jid, "to every device")
        await a.settle()
        [sent] = _messages(a)
        for device in (phone, tablet):
            _deliver(a, Message(xml=copy.deepcopy(sent.xml)), device)
            await device.settle()
            assert [m["body"] for m in device.delivered()] == ["to every device"]
        mine = Message(xml=copy.deepcopy(sent.xml))
        mine["from"] = a.xmpp.boundjid
        assert (await laptop.capsule.open(mine, replay_check=False, origin="archive")
                )["body"] == "to every device"
