"""Cheap denial of service, server-free (issue 9.8): a flood of hostile capsules costs bounded
look-ups, leaves no per-sender state behind, and does not stop an honest message."""

from __future__ import annotations

import gc
import logging
import os
import tracemalloc
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from capsule import contacts
from capsule.testing.stream import Cast, Stream, message, seal_for

FLOOD = 1000
MEMORY_BOUND = 2 * 1024 * 1024  # bytes still allocated once the flood is processed


def _body(text: str) -> ET.Element:
    el = ET.Element("{jabber:client}body")
    el.text = text
    return el


async def test_a_flood_of_hostile_capsules_is_bounded(stream_cast: Cast, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)  # a thousand DEBUG stanza dumps would dominate the run
    alice, bob, mallory = stream_cast["alice"], stream_cast["bob"], stream_cast["mallory"]
    directory = stream_cast.directory_of("alice", "mallory")
    template = seal_for(alice, [alice, bob], [_body("junk")])
    deep = ("<b>" * 200 + "</b>" * 200)
    signed_junk = [seal_for(mallory, [mallory, bob], (
        f"<envelope xmlns='urn:xmpp:sce:1'><content><x xmlns='urn:example'>{deep}</x></content>"
        f"<time stamp='2026-01-01T00:00:00Z'/><to jid='{bob.jid}'/><from jid='{mallory.jid}'/>"
        f"</envelope>").encode()) for _ in range(20)]
    async with Stream.open(bob, tmp_path, directory) as b:
        # warm-up: the honest path once, so that caches and lazy imports are not counted
        b.recv(message(seal_for(alice, [alice, bob], [_body("warm-up")]), f"{alice.jid}/x",
                       f"{bob.jid}/stream"))
        await b.settle()
        assert len(b.delivered()) == 1
        directory.fetches.clear()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(FLOOD):
            kind, sender, capsule_ = i % 4, alice.jid, template
            if kind == 0:  # a real sender, a random certificate: forced a look-up each
                capsule_ = replace(template, header=replace(template.header,
                                                            cert=os.urandom(32).hex()))
            elif kind == 1:  # invented senders, each its own JID
                sender = f"ghost{i}@capsule.test"
                capsule_ = replace(template, header=replace(template.header, sender=sender))
            elif kind == 2:  # validly signed, nested deep
                sender, capsule_ = mallory.jid, signed_junk[i % len(signed_junk)]
            else:  # a bad signature under the right certificate
                capsule_ = replace(template, signature=template.signature[:-1] + bytes(
                    [template.signature[-1] ^ 1]))
            stanza = message(capsule_, f"{sender}/x", f"{bob.jid}/stream", mid=f"f{i}")
            b.recv(stanza)
        b.recv(message(seal_for(alice, [alice, bob], [_body("still here")]), f"{alice.jid}/x",
                       f"{bob.jid}/stream", mid="honest"))
        await b.settle(timeout=120)  # generous bound: slow shared machines
        honest = [m for m in b.delivered() if m["id"] == "honest"]
        assert [m["body"] for m in honest] == ["still here"]
        refused = {f.stanza_id for f in b.errors()}
        assert refused == {f"f{i}" for i in range(FLOOD)}, sorted({f"f{i}" for i in range(FLOOD)} - refused)
        assert directory.fetches.count(alice.jid) <= 1  # one rate-limited re-look-up
        assert len(b.capsule._locks) == 0
        assert len(b.capsule.contacts.fetched) <= contacts.FETCH_MEMORY
        b.events.clear()
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        print(f"flood of {FLOOD}: memory growth {growth / 1024:.0f} KiB, "
              f"look-ups {len(directory.fetches)}")
        assert growth < MEMORY_BOUND


async def test_junk_costs_no_lookup_before_the_cheap_checks(stream_cast: Cast, tmp_path: Path) -> None:
    alice, bob, carol = stream_cast["alice"], stream_cast["bob"], stream_cast["carol"]
    directory = stream_cast.directory_of("alice", "carol")
    not_for_bob = seal_for(alice, [alice, carol], [_body("x")])
    async with Stream.open(bob, tmp_path, directory) as b:
        b.recv(message(not_for_bob, f"{alice.jid}/x", f"{bob.jid}/stream"))  # no key for us
        b.recv(message(seal_for(alice, [alice, bob], [_body("x")]), f"{carol.jid}/x",
                       f"{bob.jid}/stream"))  # signed by alice, sent by carol
        await b.settle()
        assert [f.reason for f in b.errors()] == ["not-for-us", "envelope-mismatch"]
        assert directory.fetches == []


async def test_a_rotation_is_still_looked_up_within_the_rate_limit(stream_cast: Cast,
                                                                   tmp_path: Path) -> None:
    rosa, bob = stream_cast["rosa"], stream_cast["bob"]  # rosa rotates: this test only
    directory = stream_cast.directory_of("rosa")
    async with Stream.open(bob, tmp_path, directory) as b:
        b.recv(message(seal_for(rosa, [rosa, bob], [_body("one")]), f"{rosa.jid}/x",
                       f"{bob.jid}/stream", mid="one"))
        await b.settle()
        new = stream_cast.reissue("rosa")
        directory.answers[rosa.jid] = new.bundle
        b.recv(message(seal_for(new, [new, bob], [_body("two")]), f"{rosa.jid}/x",
                       f"{bob.jid}/stream", mid="two"))
        await b.settle()
        assert [m["body"] for m in b.delivered()] == ["one", "two"]
        assert [c["jid"] for c in b.named("capsule_cert_changed")] == [rosa.jid]
        assert directory.fetches == [rosa.jid, rosa.jid]
