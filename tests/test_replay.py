"""Replay state and time rules (capsule.replay) and the journal (capsule.journal), no server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as hs
from slixmpp import ClientXMPP, Message
from slixmpp.xmlstream import ET

from capsule import core, envelope, journal
from capsule import stanza as st
from capsule.errors import (
    CorruptProfile,
    FutureCapsule,
    MalformedCapsule,
    ReplayedCapsule,
    StaleCapsule,
    StorageError,
)
from capsule.plugin import attach
from capsule.profile import FAST_KDF, Profile
from capsule.replay import (
    DEFAULT_MAX_AGE,
    DEFAULT_SKEW,
    Entry,
    Handed,
    JournalItem,
    ReplayState,
    TimeRules,
    Verdict,
)
from capsule.trust import CertificateSource, CertPair

from .helpers import PIN, capsule_of, rsa_key

NOW = core.parse_timestamp("2026-11-26T12:00:00Z")
A, B = "alice@capsule.test", "bob@capsule.test"


def entry(sender: str = A, offset: int = 0, sig: str = "aa", nid: str | None = None) -> Entry:
    return Entry(sender, nid or os.urandom(16).hex(), NOW + offset, sig)


# -- timestamps ------------------------------------------------------------------------------
@pytest.mark.parametrize("ts", ["2026-9-1T0:0:0Z", "2026-09-01T00:00:00+00:00",
                                "2026-09-01T00:00:00z", " 2026-09-01T00:00:00Z",
                                "2026-09-01T00:00:00Z\n", "\uff12\uff10\uff12\uff16-09-01T00:00:00Z",
                                "2026-13-01T00:00:00Z", "2026-09-01 00:00:00Z", ""])
def test_only_exact_utc_timestamps_pass_the_shape_check(ts: str) -> None:
    sealed = _capsule()
    bad = dataclasses.replace(sealed, header=dataclasses.replace(sealed.header, ts=ts))
    with pytest.raises(MalformedCapsule, match="bad timestamp"):
        core.check_shape(bad)


def _capsule() -> core.Capsule:
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(65537, 2048)
    return core.seal(b"<envelope/>", sender=A, sender_cert="00", signing_key=key,
                     recipients=[core.Recipient(B, "11", key.public_key())])


def test_timestamps_compare_as_times() -> None:
    assert core.parse_timestamp("2026-09-01T00:00:00Z") < core.parse_timestamp(
        "2026-12-31T23:59:59Z")


# -- time rules --------------------------------------------------------------------------------
def test_future_dated_capsule_refused_with_its_own_reason() -> None:
    state = ReplayState()
    with pytest.raises(FutureCapsule) as caught:
        state.accept(entry(offset=DEFAULT_SKEW + 1), NOW)
    assert caught.value.reason == "clock-skew"
    assert state.accept(entry(offset=DEFAULT_SKEW), NOW) is Verdict.NEW
    with pytest.raises(FutureCapsule):
        state.accept(Entry(A, "ff" * 16, core.parse_timestamp("9999-12-31T23:59:59Z"), "aa"), NOW)


def test_too_old_for_live_delivery_has_its_own_reason_and_window_is_configurable() -> None:
    with pytest.raises(StaleCapsule) as caught:
        ReplayState().accept(entry(offset=-DEFAULT_MAX_AGE - 1), NOW)
    assert caught.value.reason == "too-old"
    assert ReplayState().accept(entry(offset=-DEFAULT_MAX_AGE + 60), NOW) is Verdict.NEW
    strict = ReplayState(TimeRules(skew=5, max_age=3600))
    with pytest.raises(FutureCapsule):
        strict.accept(entry(offset=6), NOW)
    with pytest.raises(StaleCapsule):
        strict.accept(entry(offset=-3601), NOW)


def test_the_issue_attack_far_future_then_flood_refuses_nobody_else() -> None:
    """Issue 9.1: a 9999 capsule plus a flood used to lift the global horizon past now."""
    state = ReplayState(per_sender=5)
    with pytest.raises(FutureCapsule):
        state.accept(entry(A, offset=10**9), NOW)
    for i in range(50):  # the flood of current-dated capsules from the same contact
        state.accept(entry(A, offset=i - 50), NOW)
    assert state.horizon(A) <= NOW
    assert state.horizon(B) == 0
    # bob's honest capsule that waited a day in the offline queue is accepted
    assert state.accept(entry(B, offset=-86400), NOW) is Verdict.NEW


def test_horizon_stays_behind_the_clock_under_future_dated_flood() -> None:
    state = ReplayState(per_sender=5)
    for _ in range(10):  # up to twice the bound, future entries are kept, not evicted
        state.accept(entry(A, offset=DEFAULT_SKEW), NOW)
    assert state.horizon(A) == 0
    for _ in range(20):  # past twice the bound only this sender pays
        with contextlib.suppress(ReplayedCapsule):
            state.accept(entry(A, offset=DEFAULT_SKEW), NOW)
    assert state.horizon(A) <= NOW + DEFAULT_SKEW and state.horizon(B) == 0
    assert len(state) <= 10


def test_duplicate_replay_and_evicted() -> None:
    state = ReplayState(per_sender=3)
    first = entry(A, offset=-100, sig="11")
    assert state.accept(first, NOW) is Verdict.NEW
    assert state.accept(first, NOW) is Verdict.DUPLICATE  # the very capsule again
    with pytest.raises(ReplayedCapsule, match="reuses the nid"):
        state.accept(dataclasses.replace(first, sig="22"), NOW)
    assert state.accept(dataclasses.replace(first, sender=B), NOW) is Verdict.NEW  # other sender
    for i in range(5):
        state.accept(entry(A, offset=i - 50), NOW)
    with pytest.raises(ReplayedCapsule, match="older than the replay window"):
        state.accept(first, NOW)  # evicted, but behind alice's horizon


def test_forget_lets_the_resend_in() -> None:
    state = ReplayState()
    e = entry()
    state.accept(e, NOW)
    state.forget(e)
    assert state.accept(e, NOW) is Verdict.NEW


def test_entries_age_out_into_the_horizon_and_survive_a_round_trip() -> None:
    state = ReplayState(TimeRules(max_age=3600))
    old, fresh = entry(offset=-3000), entry(offset=-10)
    state.accept(old, NOW)
    state.accept(fresh, NOW)
    state.hand(Handed(fresh.sender, fresh.nid))  # the app got it
    later = NOW + 1000  # old has left the window
    again = ReplayState.from_json(state.to_json(later), TimeRules(max_age=3600))
    assert len(again) == 1 and again.horizon(A) == old.ts
    assert again.accept(fresh, later) is Verdict.DUPLICATE
    with pytest.raises(ReplayedCapsule):  # even with our clock set back an hour
        again.accept(old, NOW)





def test_what_a_bot_remembers_gives_the_collector_nothing_to_walk() -> None:
    """A bot keeps up to PER_SENDER_MAX entries per sender for 30 days: as objects of their own
    they would be walked by every full collection of its process (the cost of that grows with
    the objects alive; README, "Scaling out"). Kept as atoms, the collector stops tracking them."""
    state = ReplayState()
    state.accept(entry(A), NOW)  # a sender's own containers, once
    gc.collect()
    tracked = len(gc.get_objects())
    for i in range(2000):
        state.accept(entry(A, offset=-i), NOW)
    gc.collect()
    assert len(state) == 2001
    assert len(gc.get_objects()) - tracked < 20  # was 2000 or more: an Entry each


@settings(max_examples=200, deadline=None)
@given(flood=hs.lists(hs.tuples(hs.integers(-10**10, 10**10), hs.booleans()), max_size=60),
       honest=hs.lists(hs.tuples(hs.sampled_from([A, B]),
                                 hs.integers(-DEFAULT_MAX_AGE + 1, DEFAULT_SKEW)), max_size=4))
def test_no_traffic_of_one_sender_gets_another_senders_fresh_capsule_refused(
        flood: list[tuple[int, bool]], honest: list[tuple[str, int]]) -> None:
    state = ReplayState(per_sender=4)
    sent: list[Entry] = []
    for offset, reuse in flood:
        e = sent[-1] if reuse and sent else entry("mallory@capsule.test", offset=offset)
        sent.append(e)
        try:
            state.accept(dataclasses.replace(e, sig=os.urandom(2).hex()) if reuse else e, NOW)
        except (FutureCapsule, StaleCapsule, ReplayedCapsule):
            pass
    for sender, offset in honest:
        assert state.accept(entry(sender, offset=offset), NOW) is Verdict.NEW
    assert all(state.horizon(s) <= NOW for s in (A, B))


# -- the journal -------------------------------------------------------------------------------
@pytest.fixture
def held(tmp_path: Path) -> Profile:
    profile = Profile.create(tmp_path / "p.capsule", A, "1357902468", kdf=FAST_KDF)
    profile.hold()
    return profile


def test_journalled_entries_survive_a_crash_and_reveal_nothing(held: Profile) -> None:
    entries = [held.remember(B, os.urandom(16), core.utc_timestamp(), b"sig")[1] for _ in range(3)]
    held.append(entries[:2])
    held.append([Handed(e.sender, e.nid) for e in entries[:2]])  # the app got those two
    held.append(entries[2:])
    # no release, no save: the process "dies" here, before the app got the third
    raw = journal.journal_path(held.path).read_bytes()
    assert B.encode() not in raw and entries[0].nid.encode() not in raw
    assert entries[0].nid not in raw.hex()
    again = Profile.load(held.path, "1357902468").data.replay
    for e in entries[:2]:
        assert again.check(e, e.ts) is Verdict.DUPLICATE
    third = entries[2]
    assert again.accept(third, third.ts) is Verdict.UNHANDED  # delivered after all, once:
    assert again.accept(third, third.ts) is Verdict.DUPLICATE  # a copy meanwhile is not
    assert not again.handed(third.sender, third.nid)
    again.hand(Handed(third.sender, third.nid))
    assert again.handed(third.sender, third.nid)


def test_torn_last_record_is_dropped_but_an_altered_one_is_refused(held: Profile) -> None:
    first, second = (held.remember(B, os.urandom(16), core.utc_timestamp(), b"s")[1]
                     for _ in range(2))
    held.append([first, Handed(first.sender, first.nid)])
    held.append([second])
    path = journal.journal_path(held.path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-7])  # torn: the crash came during the second write
    loaded = Profile.load(held.path, "1357902468").data.replay
    assert loaded.check(first, first.ts) is Verdict.DUPLICATE
    assert loaded.check(second, second.ts) is Verdict.NEW  # it was never acknowledged
    header_end = raw.index(b"\n") + 1
    altered = bytearray(raw)
    altered[header_end + 30] ^= 1  # inside the first record, with a record after it
    path.write_bytes(bytes(altered))
    with pytest.raises(CorruptProfile, match="altered"):
        Profile.load(held.path, "1357902468")
    records = raw[header_end:]
    n = int.from_bytes(records[:4], "big") + 4
    path.write_bytes(raw[:header_end] + records[n:] + records[:n])  # reordered
    with pytest.raises(CorruptProfile):
        Profile.load(held.path, "1357902468")


def test_a_save_compacts_and_an_old_journal_is_ignored(held: Profile) -> None:
    e = held.remember(B, os.urandom(16), core.utc_timestamp(), b"s")[1]
    held.append([e])
    held.data.replay.hand(Handed(e.sender, e.nid))
    old = journal.journal_path(held.path).read_bytes()
    held.save()
    assert journal.journal_path(held.path).read_bytes().count(b"\n") == 1  # header only
    journal.journal_path(held.path).write_bytes(old)  # a stale journal put back
    again = Profile.load(held.path, "1357902468")
    assert again.data.replay.check(e, e.ts) is Verdict.DUPLICATE  # from the profile
    assert len(again.data.replay) == 1


async def test_group_commit_batches_and_fails_closed() -> None:
    written: list[int] = []
    failed: list[JournalItem] = []
    broken = False

    def write(entries: list[JournalItem]) -> None:
        if broken:
            raise OSError(28, "No space left on device")
        written.append(len(entries))

    commit = journal.GroupCommit(write, lambda entries, _exc: failed.extend(entries))
    futures = [commit.submit(entry()) for _ in range(600)]
    await asyncio.gather(*futures)
    assert sum(written) == 600 and max(written) <= journal.BATCH_MAX and len(written) >= 3
    broken = True
    lost = [entry() for _ in range(3)]
    futures = [commit.submit(e) for e in lost]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, StorageError) and r.reason == "storage" for r in results)
    assert failed == lost and not commit.busy


# -- through the plugin, without a server ------------------------------------------------------
class Static(CertificateSource):
    """Certificates from profiles at hand (a stand-in for PEP: the server is not the subject)."""

    def __init__(self, *profiles: Profile):
        self.bundles = {p.data.jid: CertPair(str(p.data.signing_cert).encode(),
                                               str(p.data.encryption_cert).encode())
                        for p in profiles}

    async def fetch(self, jid: str) -> CertPair | None:
        return self.bundles.get(jid)


def _sealed(sender: Profile, to: Profile, when: dt.datetime) -> str:
    cert = x509.load_pem_x509_certificate(str(to.data.encryption_cert).encode())
    sign = x509.load_pem_x509_certificate(str(sender.data.signing_cert).encode())
    text = ET.Element("{jabber:client}body")
    text.text = f"from {sender.data.jid}"
    env = envelope.encode([text], sender.data.jid, [to.data.jid], core.utc_timestamp(when))
    capsule = core.seal(env, sender=sender.data.jid, sender_cert=core.cert_fingerprint(sign),
                        signing_key=sender.data.signing_key, now=when,
                        recipients=[core.Recipient(to.data.jid, core.cert_fingerprint(cert),
                                                   rsa_key(cert))])
    msg = Message()
    msg["to"], msg["from"], msg["type"] = to.data.jid, f"{sender.data.jid}/r", "chat"
    st.from_core(msg, capsule)
    return str(msg)


async def test_plugin_time_rules_and_quiet_duplicates(identity) -> None:
    """Issue 9.1 end to end in the plugin: a 9999-dated capsule, then a flood, from alice;
    carol's capsule that waited an hour offline is still delivered; a copy is dropped quietly."""
    alice, bob, carol = identity("alice"), identity("bob"), identity("carol")
    client = ClientXMPP(bob.data.jid, "unused")
    attach(client, bob.path, PIN, allow_insecure=True, publish=False,
           source=Static(alice, carol))
    plugin = capsule_of(client)
    plugin.store.data.replay.per_sender = 5  # alice's flood evicts her own oldest entries
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    for name in ("message", "capsule_error", "capsule_duplicate"):
        client.add_event_handler(name, lambda payload, n=name: events.put_nowait((n, payload)))

    async def feed(raw: str) -> tuple[str, Any]:
        plugin._filter_in(client._build_stanza(ET.fromstring(raw)))
        return await asyncio.wait_for(events.get(), 30)

    now = dt.datetime.now(dt.UTC)
    kind, failure = await feed(_sealed(alice, bob, dt.datetime(9999, 12, 31, tzinfo=dt.UTC)))
    assert (kind, failure.reason) == ("capsule_error", "clock-skew")
    for i in range(12):
        kind, _ = await feed(_sealed(alice, bob, now - dt.timedelta(seconds=60 - i)))
        assert kind == "message"
    assert plugin.store.data.replay.horizon(alice.data.jid) > 0  # the flood did evict
    waited = _sealed(carol, bob, now - dt.timedelta(hours=1))
    kind, msg = await feed(waited)
    assert kind == "message" and msg["body"] == "from carol@capsule.test"
    kind, _ = await feed(waited)
    assert kind == "capsule_duplicate" and plugin.duplicates == 1
    kind, failure = await feed(_sealed(carol, bob, now - dt.timedelta(days=31)))
    assert (kind, failure.reason) == ("capsule_error", "too-old")
    plugin.plugin_end()
