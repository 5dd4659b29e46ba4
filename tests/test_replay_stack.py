"""Replay state under faults, over the real stack: a receiver SIGKILLed mid-burst, a full and a
read-only disk under the profile. Nothing is delivered twice, nothing honest is refused, and
while state cannot be made durable nothing is delivered at all."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import x25519
from slixmpp import Message
from slixmpp.xmlstream import ET

from capsule import signatures, v1, wire
from capsule.profile import FAST_KDF, Profile
from capsule.testing.identities import enroll
from capsule.testing.inbox import Inbox

from .helpers import BOT_PIN, Receiver

KILLS = 22
BURST = 12


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    bot = Receiver([])
    yield bot
    if bot.proc is not None and bot.proc.returncode is None:
        await bot.kill()


async def _until(predicate: Any, timeout: float) -> bool:
    for _ in range(int(timeout / 0.1)):
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return bool(predicate())


async def test_receiver_killed_mid_burst_never_accepts_a_capsule_twice(
        xmpp_stack, new_account, capsule_bot, receiver, tmp_path) -> None:
    alice = await capsule_bot("alice")
    bob = new_account("bob")
    profile = tmp_path / "bob.capsule"
    enroll(xmpp_stack.authority(), profile, bob.jid, BOT_PIN)
    # restarted on its own resource, as a bot should: the new session takes the dead one's place
    # (on a new resource every dead session waits out its resumption time, gets copies routed
    # to the bare JID, and routes them again when it times out: a storm of copies)
    account = dataclasses.replace(bob, jid=f"{bob.jid}/receiver")
    await receiver.start(xmpp_stack, account, profile)
    raws: list[str] = []
    nids: dict[str, str] = {}  # stanza id -> nid
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    for _ in range(KILLS):
        for i in range(BURST):
            msg = alice.client.make_message(mto=bob.jid, mbody=f"burst {i}", mtype="chat")
            msg["id"] = alice.client.new_id()
            sealed = await alice.capsule.encrypt_message(msg)
            element = wire.find(sealed.xml)
            assert element is not None
            nids[msg["id"]] = wire.parse(element).header.nid.hex()
            raw = str(sealed)
            raws.append(raw)
            alice.client.send_raw(raw)
            await asyncio.sleep(0)
        await asyncio.sleep(rng.uniform(0.0, 0.5))  # killed somewhere in the burst's handling
        await receiver.kill()
        await receiver.start(xmpp_stack, account, profile)  # the offline queue comes in now
    litter = [p.name for p in tmp_path.iterdir() if p.name.startswith(".bob.capsule.")]
    assert not litter, f"temp files of killed saves left beside the profile: {litter}"
    for raw in raws:  # everything again, to the restarted receiver
        alice.client.send_raw(raw)
    # every capsule is delivered (its first copy died with a receiver) or dropped as a duplicate;
    # wait until a copy of each, sent after the last kill, was judged
    judged = len(receiver.lines)

    def unjudged() -> set[str]:
        return set(nids) - {words[-1] for words in receiver.lines[judged:]}

    await _until(lambda: not unjudged(), 120)
    # now and then (1 of 264 in one Prosody run of many; cause not found yet) the server does
    # not deliver one replayed copy: counted and shown, never more than a few
    lost = len(unjudged())
    assert lost <= len(raws) // 50, f"{lost} of {len(raws)} replayed capsules were not judged"
    await asyncio.sleep(2)  # late copies would show up now
    await receiver.kill()
    odd = [words for words in receiver.lines
           if not (words[0] in ("got", "again", "dup", "error") and len(words) >= 2)]
    assert not odd, f"unexpected lines from the receiver: {odd[:5]} in " + repr(
        [r for i, r in enumerate(receiver.raw) if any(
            receiver.raw[j].split() == odd[0] for j in range(i - 2, min(i + 3, len(receiver.raw))))][:8])
    got = Counter(words[1] for words in receiver.lines if words[0] == "got")
    # accepted before a kill that came before its "handed" mark: delivered again, flagged
    # (capsule_info.recovered: the app may have seen it); never unflagged
    again = Counter(words[1] for words in receiver.lines if words[0] == "again")
    twice = {nid: n for nid, n in got.items() if n > 1}
    errors = [words for words in receiver.lines if words[0] == "error"]
    duplicates = sum(1 for words in receiver.lines if words[0] == "dup")
    print(f"\n{KILLS} kills, {len(raws)} capsules: {len(got)} delivered, {len(again)} "
          f"recovered after a kill, {duplicates} duplicates dropped, {len(twice)} twice, "
          f"{len(errors)} refused, {max(lost, 0)} replayed copies lost in transit")
    assert not twice, f"{len(twice)} capsules were accepted a second time"
    assert not errors, f"honest capsules refused: {errors[:5]}"
    missing = set(nids.values()) - set(got) - set(again)
    assert len(missing) <= lost, f"{len(missing)} capsules never reached the app"
    assert duplicates >= len(got) // 2  # the replay phase really met delivered capsules


def _resigned(bot: Any, raw: str) -> str:
    """Another capsule from the same sender with the same nid (and content): what a sender
    that reuses a nid, or a forger holding its keys, would produce. v0 (RSA-PSS) just signs
    again; Ed25519 signs deterministically, so a v1 capsule is sealed anew around the nid."""
    msg = Message(xml=ET.fromstring(raw))
    element = wire.find(msg.xml)
    assert element is not None
    capsule = wire.parse(element)
    data, ring = bot.capsule.store.data, bot.capsule.keyring
    if isinstance(capsule, v1.Capsule):
        h = capsule.header
        plain = v1.unseal(capsule, jid=data.jid, sessions=bot.capsule.store.session_keys())
        own = ring.own(int(time.time()))
        recipients = [v1.Recipient(jid, r.pub) for jid in {k.jid for k in h.keys}
                      for r in ([own] if jid == data.jid else ring.known(jid))]
        again: wire.AnyCapsule = v1.seal_with(
            plain, sender=h.sender, sender_cert=h.cert, signing_key=data.signing_key,
            recipients=recipients, ts=h.ts, message_key=os.urandom(32), iv=os.urandom(12),
            nid=h.nid, ephemeral=x25519.X25519PrivateKey.generate())
    else:
        again = dataclasses.replace(capsule, signature=signatures.sign(
            data.signing_key, wire.signed_bytes(capsule)))
    assert again.signature != capsule.signature
    copy = bot.client.make_message(mto=msg["to"], mtype="chat")
    wire.put(copy, again)
    return str(copy)


async def test_resend_is_dropped_quietly_and_nid_reuse_is_a_replay_also_after_restart(
        capsule_bot) -> None:
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    inbox = Inbox(bob.client)
    msg = alice.client.make_message(mto=bob.jid, mbody="once only", mtype="chat")
    raw = str(await alice.capsule.encrypt_message(msg))
    alice.client.send_raw(raw)
    assert (await inbox.message())["body"] == "once only"
    reused = _resigned(alice, raw)
    for bot in (bob, None):
        if bot is None:  # restart: the profile is saved on disconnect
            await bob.client.disconnect(wait=1)
            bot = await capsule_bot("bob", account=bob.account, profile=bob.profile)
            inbox = Inbox(bot.client)
        alice.client.send_raw(raw)  # the very capsule again: a resend, not an attack
        assert await _until(lambda b=bot: b.capsule.duplicates == 1, 15)
        alice.client.send_raw(reused)  # same sender and nid, another signature
        assert (await inbox.error()).reason == "replay"
        await inbox.nothing(0.5)
        assert inbox.errors.empty()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of our own: fillable and remountable read-only."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)
    return filler


def _remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


@pytest.mark.parametrize("fault", ["full", "read-only"])
async def test_storage_failure_refuses_delivery_and_recovers(
        xmpp_stack, new_account, capsule_bot, small_disk, fault) -> None:
    alice = await capsule_bot("alice")
    account = new_account("bob")
    profile = small_disk / "bob.capsule"
    enroll(xmpp_stack.authority(), profile, account.jid, BOT_PIN)
    other = small_disk / "other.capsule"
    Profile.create(other, "other@capsule.test", BOT_PIN, kdf=FAST_KDF, short_pin=True)
    if fault == "read-only":  # (a file open for writing would block the remount)
        _remount(small_disk, "ro")
    bob = await capsule_bot("bob", account=account, profile=profile, storage_retry=0.2)
    inbox = Inbox(bob.client)
    recovered: asyncio.Queue[str] = asyncio.Queue()
    bob.client.add_event_handler("capsule_storage_recovered", recovered.put_nowait)

    async def seal(text: str) -> str:
        msg = alice.client.make_message(mto=bob.jid, mbody=text, mtype="chat")
        msg["id"] = text.replace(" ", "-")
        return str(await alice.capsule.encrypt_message(msg))

    general: list[Any] = []  # storage failures not about one capsule

    async def outcome(text: str) -> str:
        """'delivered' or the refusal's reason, for the capsule sent with ``text``."""
        wanted = text.replace(" ", "-")
        for _ in range(300):
            with contextlib.suppress(asyncio.QueueEmpty):
                msg = inbox.messages.get_nowait()
                assert msg["id"] == wanted, f"{msg['id']} delivered, waiting for {wanted}"
                return "delivered"
            with contextlib.suppress(asyncio.QueueEmpty):
                failure = inbox.errors.get_nowait()
                if not failure.stanza_id:
                    general.append(failure)
                    continue
                assert failure.stanza_id == wanted
                return str(failure.reason)
            await asyncio.sleep(0.05)
        raise AssertionError(f"{text}: neither delivered nor refused")

    sent: list[str] = []
    filler = None
    if fault == "full":
        sent.append(await seal("before the fault"))
        alice.client.send_raw(sent[0])
        assert (await inbox.message())["body"] == "before the fault"
        filler = _fill(small_disk)
    # tmpfs may still fit a few records in the journal's last page: those are durable and
    # delivered; the first that cannot be written must be refused, and so is all that follows
    refused = []
    for i in range(200):
        raw = await seal(f"during the fault {i}")
        sent.append(raw)
        alice.client.send_raw(raw)
        result = await outcome(f"during the fault {i}")
        if result != "delivered":
            assert result == "storage"
            refused.append(raw)
            break
    assert refused, "the full/read-only disk was never noticed"
    for i in range(3):  # still broken: refused, said so, nothing delivered
        raw = await seal(f"still broken {i}")
        refused.append(raw)
        alice.client.send_raw(raw)
        assert await outcome(f"still broken {i}") == "storage"
    await inbox.nothing(0.5)
    assert {f.reason for f in general} <= {"storage"}  # (read-only: said before we listened)
    # a command on the same disk fails loudly too: one line, exit status 1
    command = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "capsule.cli", "profile", "change-pin",
                         "--profile", str(other)], capture_output=True, text=True,
        env={**os.environ, "CAPSULE_PIN": BOT_PIN, "CAPSULE_NEW_PIN": "a new long passphrase"})
    assert command.returncode == 1
    assert command.stderr.startswith("capsule: error: cannot ") and str(other) in command.stderr
    assert command.stderr.count("\n") == 1
    if filler is not None:
        filler.unlink()
    else:
        _remount(small_disk, "rw")
    await asyncio.wait_for(recovered.get(), 15)  # by itself, with no traffic
    for raw in refused:  # the sender's resends are accepted now, once each
        alice.client.send_raw(raw)
    bodies = sorted([(await inbox.message())["body"] for _ in refused])
    last = len(sent) - 1 - (fault == "full")
    assert bodies == sorted([f"during the fault {last}"] + [f"still broken {i}" for i in range(3)])
    await inbox.nothing(0.5)
    # after a restart nothing that was delivered is accepted again, and no error is raised
    await bob.client.disconnect(wait=1)
    again = await capsule_bot("bob", account=account, profile=profile)
    inbox = Inbox(again.client)
    everything = [*sent, *refused[1:]]
    for raw in everything:
        alice.client.send_raw(raw)
    assert await _until(lambda: again.capsule.duplicates == len(everything), 30)
    await inbox.nothing(0.5)
    assert inbox.errors.empty()
