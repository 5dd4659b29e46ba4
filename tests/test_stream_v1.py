"""Wire format v1 in the plugin, server-free: v1 whenever every recipient has valid session
keys, v0 otherwise (or refused under forward_secrecy='require'); v0 and v1 peers talk; hostile
session records are ignored; a capsule whose session key was destroyed never opens again."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from slixmpp import Message

from capsule import algorithms as alg
from capsule import core, files, sessions, signatures, v1, wire
from capsule import profile as profile_module
from capsule.plugin import capsule_info
from capsule.profile import Profile
from capsule.testing.stream import PIN, Cast, Identity, Stream, message, seal_for
from tests.streams import (
    V0,
    V1,
    introduce,
    pair,
    send_text,
    sent_messages,
    start_session,
    v1_capsule_from,
    versions,
)


def _deliver(a: Stream, msg: Message, b: Stream) -> None:
    """What the server does with a sent stanza: stamp the sender's full JID, hand it over."""
    msg["from"] = a.xmpp.boundjid
    b.recv(msg)


async def test_v1_when_the_recipient_has_session_keys_and_both_sides_read_it(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with pair(stream_cast, tmp_path, policy="require") as (a, b):
        sent = await v1_capsule_from(a, b, "forward secret")
        assert versions([sent]) == [V1]
        assert "forward secret" not in str(sent)
        a_copy = Message(xml=sent.xml)
        _deliver(a, sent, b)
        await b.settle()
        [got] = b.delivered()
        info = capsule_info(got)
        assert got["body"] == "forward secret" and info is not None
        assert info.version == 1 and info.forward_secret  # what the app sees of the format
        # the sender's own copy (her archive) opens with her own session key
        a_copy["from"] = a.xmpp.boundjid
        mine = await a.capsule.open(a_copy, replay_check=False, origin="archive")
        assert mine["body"] == "forward secret"


async def test_v0_to_a_peer_without_session_keys_and_v1_peers_open_v0(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with pair(stream_cast, tmp_path, policy="require") as (a, b):
        start_session(a)  # alice is v1-capable; bob publishes no session keys (an older Capsule)
        contact = await a.capsule.contact(b.me.jid)
        assert a.capsule.keyring.learn(b.me.jid, contact.sign, [], int(time.time())) == []
        send_text(a, b.me.jid, "still sealed")
        await a.settle()
        [sent] = sent_messages(a)
        assert versions([sent]) == [V0]
        _deliver(a, sent, b)
        await b.settle()
        [got] = b.delivered()
        info = capsule_info(got)
        assert got["body"] == "still sealed" and info is not None
        assert info.version == 0 and not info.forward_secret  # a downgrade the app can see


async def test_forward_secrecy_required_refuses_v0_both_ways(stream_cast: Cast,
                                                             tmp_path: Path) -> None:
    async with pair(stream_cast, tmp_path, policy="require", forward_secrecy="require") as (a, b):
        start_session(a)
        send_text(a, b.me.jid, "needs fs")  # bob: no record
        await a.settle()
        assert sent_messages(a) == []
        assert [f.reason for f in a.errors()] == ["no-forward-secrecy"]
        a.capsule.sender.options = dataclasses.replace(  # alice sends v0 after all...
            a.capsule.sender.options, forward_secrecy="prefer")
        send_text(a, b.me.jid, "needs fs")
        await a.settle()
        [sent] = sent_messages(a)
        assert versions([sent]) == [V0]
        _deliver(a, sent, b)  # ...and bob, who requires forward secrecy, refuses it
        await b.settle()
        assert b.delivered() == [] and [f.reason for f in b.errors()] == ["no-forward-secrecy"]


@pytest.mark.parametrize("attack", ["signed-by-another", "another-jids-record", "expired"])
async def test_hostile_session_records_give_no_v1(stream_cast: Cast, tmp_path: Path,
                                                  attack: str) -> None:
    async with pair(stream_cast, tmp_path, "carol", policy="require",
                     forward_secrecy="require") as (a, c):
        start_session(a)
        start_session(c)
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
        send_text(a, "bob@capsule.test", "for bob only")
        await a.settle()
        assert sent_messages(a) == [] and [f.reason for f in a.errors()] == ["no-forward-secrecy"]


async def test_after_retention_the_archived_capsule_is_session_expired(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with pair(stream_cast, tmp_path) as (a, b):
        archived = await v1_capsule_from(a, b, "gone after retention")
        archived["from"] = a.xmpp.boundjid
        later = int(time.time()) + alg.SESSION_LIFETIME_S + alg.SESSION_RETENTION_S
        b.capsule.keyring.rotate(later)  # destroys the key
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
    async with pair(stream_cast, tmp_path) as (a, phone), \
            Stream.open(stream_cast["bob"], tmp_path / "t", source, resource="tablet") as tablet, \
            Stream.open(stream_cast["alice"], tmp_path / "l", source, resource="laptop") as laptop:
        for device in (a, phone, tablet, laptop):
            start_session(device)
        now = int(time.time())
        bob_sign = (await a.capsule.contact(phone.me.jid)).sign
        published = [d.capsule.store.current_sessions(now)[0] for d in (phone, tablet)]
        assert published[0] != published[1]
        assert len(a.capsule.keyring.learn(phone.me.jid, bob_sign, published, now)) == 2
        own = [d.capsule.store.current_sessions(now)[0] for d in (a, laptop)]
        a.capsule.keyring.learn(a.me.jid, a.capsule.own_sign, own, now)
        send_text(a, phone.me.jid, "to every device")
        await a.settle()
        [sent] = sent_messages(a)
        for device in (phone, tablet):
            _deliver(a, Message(xml=copy.deepcopy(sent.xml)), device)
            await device.settle()
            assert [m["body"] for m in device.delivered()] == ["to every device"]
        mine = Message(xml=copy.deepcopy(sent.xml))
        mine["from"] = a.xmpp.boundjid
        assert (await laptop.capsule.open(mine, replay_check=False, origin="archive")
                )["body"] == "to every device"


def _body(text: str) -> ET.Element:
    el = ET.Element("{jabber:client}body")
    el.text = text
    return el


async def test_forward_secrecy_required_refuses_a_v0_carbon_but_history_reads_it(
        stream_cast: Cast, tmp_path: Path) -> None:
    """A carbon is a live copy the server chose to send: under ``require`` a v0 one is refused
    like a live v0; the archive still opens it, and says it was no forward-secret capsule."""
    alice = stream_cast["alice"]
    async with Stream.open(stream_cast["bob"], tmp_path, stream_cast.directory_of("alice", "bob"),
                           policy="require", forward_secrecy="require", carbons=True) as b:
        v0 = seal_for(alice, [alice, b.me], [_body("v0 via carbon")])
        inner = message(v0, f"{alice.jid}/x", f"{b.me.jid}/other", mid="o1").replace(
            "<message ", "<message xmlns='jabber:client' ", 1)
        b.recv(f"<message from='{b.me.jid}' to='{b.xmpp.boundjid}' type='chat' id='c'>"
               f"<received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
               f"{inner}</forwarded></received></message>")
        await b.settle()
        assert b.delivered() == [] and [f.reason for f in b.errors()] == ["no-forward-secrecy"]
        archived = Message(xml=ET.fromstring(inner))
        old = await b.capsule.open(archived, replay_check=False, origin="archive")
        info = capsule_info(old)
        assert old["body"] == "v0 via carbon"
        assert info is not None and info.version == 0 and not info.forward_secret


def test_forward_secrecy_require_needs_policy_require(stream_cast: Cast, tmp_path: Path) -> None:
    """Plaintext has no forward secrecy either: the contradiction is refused at attach."""
    with pytest.raises(ValueError, match="policy='require'"):
        Stream(stream_cast["alice"], tmp_path, stream_cast.directory_of("alice"),
               forward_secrecy="require")  # policy: the default, prefer
    with pytest.raises(ValueError):
        Stream(stream_cast["alice"], tmp_path, stream_cast.directory_of("alice"),
               policy="off", forward_secrecy="require")


def _low_order_record(cast: Cast, name: str, now: int) -> sessions.SessionRecord:
    """A record the contact really signed, for the all-zero public key (RFC 7748, 6.1)."""
    who = cast[name]
    unsigned = sessions.SessionRecord(bytes(32), who.sign_fp, core.utc_timestamp(
        dt.datetime.fromtimestamp(now, dt.UTC)), core.utc_timestamp(
        dt.datetime.fromtimestamp(now + 3600, dt.UTC)), b"")
    return dataclasses.replace(unsigned, signature=signatures.sign(
        who.signing_key, sessions.session_bytes(who.jid, unsigned)))


async def test_a_signed_low_order_session_key_is_refused_and_sends_still_work(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with pair(stream_cast, tmp_path, "carol") as (a, c):
        start_session(a)
        start_session(c)
        now = int(time.time())
        bob_sign = (await a.capsule.contact("bob@capsule.test")).sign
        assert a.capsule.keyring.learn("bob@capsule.test", bob_sign,
                                       [_low_order_record(stream_cast, "bob", now)], now) == []
        send_text(a, "bob@capsule.test", "to bob")  # no valid record: v0, not a dead task
        await a.settle()
        assert versions(sent_messages(a)) == [V0] and a.errors() == []


async def test_an_unexpected_failure_while_sealing_is_a_capsule_error(
        stream_cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the send path (here a fake one) refuses the message and tells the app, rather
    than dying in a task nobody awaits."""
    async with pair(stream_cast, tmp_path) as (a, b):
        start_session(a)
        start_session(b)
        await introduce(a, b)

        def broken(*_args: Any, **_kwargs: Any) -> v1.Capsule:
            raise ValueError("a bug")

        monkeypatch.setattr(v1, "seal", broken)
        send_text(a, b.me.jid, "never in plaintext")
        await a.settle()
        assert sent_messages(a) == [] and [f.reason for f in a.errors()] == ["seal-failed"]


def _with_old_session(who: Identity, where: Path) -> Identity:
    """``who`` whose profile holds a session key long past retention."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / "old.capsule"
    shutil.copyfile(who.profile, path)
    profile = Profile.load(path, PIN)
    profile.new_session(int(time.time()) - 40 * 86400)
    profile.save()
    return dataclasses.replace(who, profile=path)


@pytest.mark.parametrize("publish", [False, True])
async def test_session_keys_are_destroyed_at_start_publishing_or_not(
        stream_cast: Cast, tmp_path: Path, publish: bool) -> None:
    """Forward secrecy must not wait for a login or for publishing: the plugin destroys what
    is past retention when it opens the profile (not connected here), on disk too."""
    alice = _with_old_session(stream_cast["alice"], tmp_path / "src")
    async with Stream.open(alice, tmp_path, stream_cast.directory_of("alice"),
                           publish=publish) as a:
        store = a.capsule.store
        fresh = 1 if publish else 0  # publishing: the login's new key, made at start
        assert len(store.data.sessions) == fresh and len(store.data.destroyed) == 1
        assert len(Profile.load(store.path, PIN).data.sessions) == fresh  # on disk too


async def test_session_keys_are_destroyed_hourly_while_offline(stream_cast: Cast,
                                                               tmp_path: Path) -> None:
    async with Stream.open(stream_cast["alice"], tmp_path, stream_cast.directory_of("alice"),
                           session_rotate=1) as a:  # the check runs every second then
        store = a.capsule.store
        store.new_session(int(time.time()) - 40 * 86400)
        assert not a.xmpp.sessionstarted
        for _ in range(300):  # bounded: 30 s
            if not store.data.sessions:
                break
            await asyncio.sleep(0.1)
        assert store.data.sessions == [] and len(store.data.destroyed) == 1


async def test_a_failed_save_of_a_destruction_is_retried(
        stream_cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (a fake: the first write fails) while destroying at a login: reported,
    retried like every storage failure, then recovered with the key gone from the disk."""
    async with Stream.open(stream_cast["alice"], tmp_path, stream_cast.directory_of("alice"),
                           storage_retry=0.1) as a:
        old = a.capsule.store.new_session(int(time.time()) - 40 * 86400)
        a.capsule.store.save()
        writes = {"n": 0}
        real = files.write_private

        def full_once(path: Path, data: bytes) -> None:
            writes["n"] += 1
            if writes["n"] == 1:
                raise OSError(28, "No space left on device")
            real(path, data)

        monkeypatch.setattr(profile_module, "write_private", full_once)
        a.xmpp.event("session_start")
        for _ in range(300):  # bounded: 30 s
            if a.named("capsule_storage_recovered"):
                break
            await asyncio.sleep(0.1)
        assert [f.reason for f in a.errors()] == ["storage"]
        assert a.named("capsule_storage_recovered") and writes["n"] >= 2
        on_disk = Profile.load(a.capsule.store.path, PIN)
        assert old.record.sid not in on_disk.session_keys()
