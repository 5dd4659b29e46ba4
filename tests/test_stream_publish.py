"""What a login publishes (issue 15): our certificates and session keys go to PEP only when the
node does not hold them already, with the options a publish sets; every failed read publishes as
before, and ``capsule_published`` is raised either way once the node holds our chain.

Server-free: a fake of our account's PEP service (:class:`FakePep`) answers the stream's IQs
from a dict, so a test sees exactly which IQs a login sent.
"""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from slixmpp.xmlstream import StanzaBase

from capsule import discovery, plugin, stanza_v1
from capsule import namespaces as ns
from capsule.profile import Profile
from capsule.testing.stream import Cast, Stream

PUBSUB = "{http://jabber.org/protocol/pubsub}pubsub"
OWNER = "{http://jabber.org/protocol/pubsub#owner}pubsub"
OPEN = {"pubsub#access_model": "open", "pubsub#persist_items": "1"}


@dataclass
class FakePep:
    """A fake PEP service of one account (PEP needs a server): items and node options by node;
    a node in ``failing`` answers reads with an error (None: never, a time-out). Records the
    nodes published to."""

    items: dict[str, ET.Element] = field(default_factory=dict)
    options: dict[str, dict[str, str]] = field(default_factory=dict)
    failing: dict[str, str | None] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)

    def answer(self, stream: Stream, iq: StanzaBase) -> str | None:
        me = stream.xmpp.boundjid
        head = f"<iq type='{{}}' id='{iq['id']}' from='{me.bare}' to='{me}'>"
        pubsub, owner = iq.xml.find(PUBSUB), iq.xml.find(OWNER)
        node = next((el.get("node", "") for el in (pubsub if pubsub is not None else owner or [])
                     if el.get("node")), "")
        if iq["type"] == "get" and node in self.failing:
            condition = self.failing[node]
            return None if condition is None else (
                head.format("error") + f"<error type='wait'><{condition} "
                "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
        if pubsub is not None and iq["type"] == "set":
            publish = pubsub.find("{http://jabber.org/protocol/pubsub}publish")
            assert publish is not None
            self.items[node] = publish[0][0]
            self.options[node] = dict(OPEN)
            self.published.append(node)
            return head.format("result") + "</iq>"
        if pubsub is not None:
            if node not in self.items:
                return (head.format("error") + "<error type='cancel'><item-not-found "
                        "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
            payload = ET.tostring(self.items[node], encoding="unicode")
            return (head.format("result") + f"<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
                    f"<items node='{node}'><item id='current'>{payload}</item></items></pubsub>"
                    f"</iq>")
        if owner is not None and iq["type"] == "set":  # a reconfiguration: applied
            for field_ in owner.iter("{jabber:x:data}field"):
                if field_.get("var") != "FORM_TYPE":
                    value = field_.find("{jabber:x:data}value")
                    self.options.setdefault(node, {})[field_.get("var", "")] = (
                        "" if value is None else value.text or "")
            return head.format("result") + "</iq>"
        if owner is not None:
            fields = "".join(f"<field var='{k}'><value>{v}</value></field>"
                             for k, v in self.options.get(node, {}).items())
            return (head.format("result") + "<pubsub xmlns='http://jabber.org/protocol/pubsub#"
                    f"owner'><configure node='{node}'><x xmlns='jabber:x:data' type='form'>"
                    f"{fields}</x></configure></pubsub></iq>")
        raise AssertionError(f"unexpected IQ {iq}")

    async def log_in(self, stream: Stream, timeout: float = 30) -> None:
        """Raise session_start and serve the login's IQs until both publications are
        reported (a bounded wait)."""
        reported: set[str] = set()
        for name in ("capsule_published", "capsule_sessions_published",
                     "capsule_publish_failed"):
            stream.xmpp.add_event_handler(name, lambda _d, name=name: reported.add(name))
        stream.xmpp.event("session_start")
        deadline = time.monotonic() + timeout
        while not {"capsule_published", "capsule_sessions_published"} <= reported:
            assert time.monotonic() < deadline, f"the login did not finish: {reported}"
            assert "capsule_publish_failed" not in reported
            await asyncio.sleep(0.005)
            self.serve(stream)
        await stream.settle()

    def serve(self, stream: Stream) -> None:
        """Answer the IQs the stream sent since the last call."""
        for stanza in stream.sent():
            if stanza.name == "iq" and (answer := self.answer(stream, stanza)):
                stream.recv(answer)


def _chain(stream: Stream) -> dict[str, str]:
    data = stream.capsule.store.data
    assert data.signing_cert and data.encryption_cert and data.ca_root
    return {"sign": data.signing_cert, "encrypt": data.encryption_cert, "ca": data.ca_root}


def _holding_our_chain(stream: Stream) -> FakePep:
    return FakePep(items={ns.CERTS_NODE: discovery.certs_payload(_chain(stream)).xml},
                   options={ns.CERTS_NODE: dict(OPEN)})


async def test_no_certificates_publish_when_the_node_holds_our_chain(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with Stream.open(stream_cast["alice"], tmp_path, None, publish=True) as alice:
        pep = _holding_our_chain(alice)
        await pep.log_in(alice)
        assert pep.published == [ns.SESSIONS_NODE]  # a new session key at login: written


async def test_a_restart_within_the_rotation_floor_writes_nothing(
        stream_cast: Cast, tmp_path: Path) -> None:
    """The second login minutes after the first keeps its session key, and the node holds both
    the key and the chain: no write at all."""
    pep = FakePep()
    async with Stream.open(stream_cast["alice"], tmp_path, None, publish=True) as first:
        await pep.log_in(first)
        assert sorted(pep.published) == [ns.CERTS_NODE, ns.SESSIONS_NODE]
    pep.published.clear()
    async with Stream.open(stream_cast["alice"], tmp_path, None, publish=True,
                           restart=True) as again:
        await pep.log_in(again)
        assert pep.published == []
        held, _ = stanza_v1.parse_sessions(pep.items[ns.SESSIONS_NODE])
        assert held == again.capsule.store.current_sessions(int(time.time()))[:1]


async def test_a_different_chain_is_replaced(stream_cast: Cast, tmp_path: Path) -> None:
    old = _chain_of(stream_cast, "bob")
    async with Stream.open(stream_cast["alice"], tmp_path, None, publish=True) as alice:
        pep = FakePep(items={ns.CERTS_NODE: discovery.certs_payload(old).xml},
                      options={ns.CERTS_NODE: dict(OPEN)})
        await pep.log_in(alice)
        assert ns.CERTS_NODE in pep.published
        assert discovery.holds_chain([pep.items[ns.CERTS_NODE]], _chain(alice))


def _chain_of(cast: Cast, name: str) -> dict[str, str]:
    data = cast[name]
    return {"sign": data.bundle.sign.decode(), "encrypt": data.bundle.encrypt.decode()}


async def test_our_chain_plus_a_stray_certificate_is_replaced(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with Stream.open(stream_cast["alice"], tmp_path, None, publish=True) as alice:
        item = discovery.certs_payload({**_chain(alice)}).xml
        item.append(discovery.certs_payload({"sign": _chain_of(stream_cast, "bob")["sign"]}
                                            ).xml[0])
        pep = FakePep(items={ns.CERTS_NODE: item}, options={ns.CERTS_NODE: dict(OPEN)})
        await pep.log_in(alice)
        assert ns.CERTS_NODE in pep.published


async def test_our_chain_on_a_node_with_other_options_is_published_again(
        stream_cast: Cast, tmp_path: Path) -> None:
    """Contacts must be able to read the node: a publish sets its options, a skipped one
    would not."""
    async with Stream.open(stream_cast["alice"], tmp_path, None, publish=True) as alice:
        pep = _holding_our_chain(alice)
        pep.options[ns.CERTS_NODE]["pubsub#access_model"] = "presence"
        await pep.log_in(alice)
        assert ns.CERTS_NODE in pep.published


async def test_a_missing_item_is_published(stream_cast: Cast, tmp_path: Path) -> None:
    async with Stream.open(stream_cast["alice"], tmp_path, None, publish=True) as alice:
        pep = FakePep()
        await pep.log_in(alice)
        assert sorted(pep.published) == [ns.CERTS_NODE, ns.SESSIONS_NODE]
        assert discovery.holds_chain([pep.items[ns.CERTS_NODE]], _chain(alice))


async def test_a_failed_read_publishes_as_before(stream_cast: Cast, tmp_path: Path) -> None:
    """A read that errs or times out tells us nothing: publish."""
    for failure in ("internal-server-error", None):
        async with Stream.open(stream_cast["alice"], tmp_path / str(failure), None,
                               publish=True, fetch_timeout=1) as alice:
            pep = _holding_our_chain(alice)
            pep.failing[ns.CERTS_NODE] = failure
            await pep.log_in(alice)
            assert ns.CERTS_NODE in pep.published, failure


async def test_a_login_saves_the_profile_once_with_the_session_key_it_publishes(
        stream_cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The login's new session key is in the profile's first save (a fleet's logins each
    stalled the event loop on a second fsynced save), and on disk before it is published."""
    saved: list[set[bytes]] = []
    save = Profile.save

    def spy(profile: Profile) -> None:
        saved.append(set(profile.session_keys()))
        save(profile)

    monkeypatch.setattr(Profile, "save", spy)
    async with Stream.open(stream_cast["alice"], tmp_path, None, publish=True) as alice:
        pep = FakePep()
        await pep.log_in(alice)
        [record], _ = stanza_v1.parse_sessions(pep.items[ns.SESSIONS_NODE])
        assert len(saved) == 1 and record.sid in saved[0]


async def test_a_failed_read_of_our_session_keys_is_retried_until_they_are_published(
        stream_cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without our item we have nothing to merge our new record into, so nothing is written;
    but contacts seal v0 to us while no session key is on PEP: the publish is tried again."""
    monkeypatch.setattr(plugin, "PUBLISH_RETRY_S", (0.2, 1.0))
    async with Stream.open(stream_cast["alice"], tmp_path, None, publish=True,
                           fetch_timeout=1) as alice:
        pep = FakePep(failing={ns.SESSIONS_NODE: "internal-server-error"})
        retried, published = False, asyncio.Event()
        alice.xmpp.add_event_handler("capsule_sessions_published", lambda _: published.set())
        alice.xmpp.sessionstarted = True  # as slixmpp's bind feature does before the event
        alice.xmpp.event("session_start")
        deadline = time.monotonic() + 30
        while not published.is_set():
            assert time.monotonic() < deadline, "our session keys were never published"
            if alice.errors() and not retried:  # the failed read, reported; the server heals
                assert [e.reason for e in alice.errors()] == ["lookup-failed"]
                del pep.failing[ns.SESSIONS_NODE]
                retried = True
            await asyncio.sleep(0.01)
            pep.serve(alice)
        assert retried and ns.SESSIONS_NODE in pep.published


async def test_a_node_that_drops_our_item_while_we_are_offline_is_restored(
        stream_cast: Cast, tmp_path: Path) -> None:
    """Another client of the account set purge_offline (and an open publish model): while the
    bot was offline contacts would find no certificates, and under policy prefer send
    plaintext. The login restores both, whether it publishes or not."""
    async with Stream.open(stream_cast["alice"], tmp_path, None, publish=True) as alice:
        pep = _holding_our_chain(alice)
        pep.options[ns.CERTS_NODE].update({"pubsub#purge_offline": "1",
                                            "pubsub#publish_model": "open"})
        await pep.log_in(alice)
        assert pep.options[ns.CERTS_NODE]["pubsub#purge_offline"] == "0"
        assert pep.options[ns.CERTS_NODE]["pubsub#publish_model"] == "publishers"
        assert ns.CERTS_NODE not in pep.published  # the item itself was ours
