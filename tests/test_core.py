"""The pure crypto core and the envelope: round trips, tampering, addressing, malformed input."""

from __future__ import annotations

import dataclasses
import struct
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from capsule import core, envelope
from capsule.errors import (
    BadSignature,
    DecryptionFailed,
    EnvelopeMismatch,
    MalformedCapsule,
    NotAddressedToUs,
)

from .helpers import body


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey]:
    return {name: rsa.generate_private_key(65537, 2048)
            for name in ("alice-sign", "alice-enc", "bob-enc", "carol-enc")}


def seal_for(keys: dict[str, rsa.RSAPrivateKey], names: list[str], text: str = "hi") -> core.Capsule:
    recipients = [core.Recipient(f"{n}@x.test", f"{n}-fp", keys[f"{n}-enc"].public_key())
                  for n in names]
    env = envelope.encode(body(text), "alice@x.test", [f"{n}@x.test" for n in names if n != "alice"],
                          core.utc_timestamp())
    return core.seal(env, sender="alice@x.test", sender_cert="alice-sign-fp",
                     signing_key=keys["alice-sign"], recipients=recipients)


def open_as(keys: dict[str, rsa.RSAPrivateKey], capsule: core.Capsule, name: str) -> envelope.Envelope:
    core.verify(capsule, keys["alice-sign"].public_key())
    plain = core.unseal(capsule, jid=f"{name}@x.test", certs={f"{name}-fp": keys[f"{name}-enc"]})
    return envelope.decode(plain)


def test_round_trip_to_several_recipients_and_self(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    capsule = seal_for(keys, ["bob", "carol", "alice"], "secret plan")
    assert len(capsule.header.keys) == 3
    for name in ("bob", "carol", "alice"):
        env = open_as(keys, capsule, name)
        assert env.content[0].text == "secret plan"
        assert env.sender == "alice@x.test"
        assert env.recipients == ("bob@x.test", "carol@x.test")
    assert b"secret plan" not in capsule.payload


def test_every_message_has_fresh_key_iv_and_nid(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    a, b = seal_for(keys, ["bob"]), seal_for(keys, ["bob"])
    assert a.header.iv != b.header.iv and a.header.nid != b.header.nid
    assert a.header.keys[0].wrapped != b.header.keys[0].wrapped


def _flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1:]


TAMPERINGS = {
    "payload": lambda c: dataclasses.replace(c, payload=_flip(c.payload, 5)),
    "signature": lambda c: dataclasses.replace(c, signature=_flip(c.signature, 7)),
    "wrapped key": lambda c: dataclasses.replace(c, header=dataclasses.replace(
        c.header, keys=(dataclasses.replace(c.header.keys[0], wrapped=_flip(c.header.keys[0].wrapped)),
                        *c.header.keys[1:]))),
    "iv": lambda c: dataclasses.replace(c, header=dataclasses.replace(c.header, iv=_flip(c.header.iv))),
    "nid": lambda c: dataclasses.replace(c, header=dataclasses.replace(c.header, nid=_flip(c.header.nid))),
    "timestamp": lambda c: dataclasses.replace(c, header=dataclasses.replace(
        c.header, ts="2020-01-01T00:00:00Z")),
    "sender": lambda c: dataclasses.replace(c, header=dataclasses.replace(c.header, sender="eve@x.test")),
    "dropped key": lambda c: dataclasses.replace(c, header=dataclasses.replace(
        c.header, keys=c.header.keys[:1])),
}


@pytest.mark.parametrize("field", TAMPERINGS)
def test_any_tampering_breaks_the_signature(keys: dict[str, rsa.RSAPrivateKey], field: str) -> None:
    capsule = TAMPERINGS[field](seal_for(keys, ["bob", "carol"]))
    with pytest.raises(BadSignature, match="does not verify"):
        core.verify(capsule, keys["alice-sign"].public_key())


def test_gcm_binds_header_even_without_signature_check(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    capsule = TAMPERINGS["timestamp"](seal_for(keys, ["bob"]))
    with pytest.raises(DecryptionFailed, match="does not authenticate"):
        core.unseal(capsule, jid="bob@x.test", certs={"bob-fp": keys["bob-enc"]})


def test_signed_bytes_are_length_prefixed_and_key_order_independent(
        keys: dict[str, rsa.RSAPrivateKey]) -> None:
    capsule = seal_for(keys, ["bob", "carol"])
    shuffled = dataclasses.replace(capsule, header=dataclasses.replace(
        capsule.header, keys=tuple(reversed(capsule.header.keys))))
    assert core.signed_bytes(shuffled) == core.signed_bytes(capsule)
    data = core.signed_bytes(capsule)
    (n,) = struct.unpack(">I", data[:4])
    assert data[4:4 + n] == b"urn:capsule:0"
    assert data.endswith(struct.pack(">I", len(capsule.payload)) + capsule.payload)


def test_not_addressed_to_us(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    capsule = seal_for(keys, ["bob"])
    with pytest.raises(NotAddressedToUs, match=r"carol@x\.test"):
        core.unseal(capsule, jid="carol@x.test", certs={"carol-fp": keys["carol-enc"]})


@pytest.mark.parametrize(("change", "message"), [
    ({"nid": b"short"}, "nid must be 16 bytes"),
    ({"iv": b"\0" * 8}, "iv must be 12 bytes"),
    ({"keys": ()}, "no <key>"),
    ({"ts": "yesterday"}, "bad timestamp"),
    ({"sender": "alice@x.test/phone"}, "not a bare JID"),
])
def test_malformed_shapes_rejected_before_crypto(keys: dict[str, rsa.RSAPrivateKey],
                                                 change: dict[str, Any], message: str) -> None:
    capsule = seal_for(keys, ["bob"])
    bad = dataclasses.replace(capsule, header=dataclasses.replace(capsule.header, **change))
    with pytest.raises(MalformedCapsule, match=message):
        core.verify(bad, keys["alice-sign"].public_key())


def _header(sender: str, *keyed: str) -> core.Header:
    return core.Header(sender, "fp", b"n" * 16, "t",
                       tuple(core.KeyEntry(j, "fp", b"k") for j in keyed), b"i" * 12)


def test_an_envelope_carries_its_content_whole() -> None:
    """Every element, attribute (namespaced ones and xml:lang too), text and tail comes out as
    it went in; names that need escaping stay names."""
    rich = ET.fromstring(
        "<html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/"
        "xhtml' xmlns:f='urn:x:f' f:style='v' xml:lang='en'><p>a &amp; <b>b</b> c</p></body>"
        "</html>")
    text = body("<1> & 'two' \"3\"")
    text[0].tail = "\n "
    sender, to = "a'l&ice@x.test", ["b<o>b@x.test", 'c"a@x.test']
    env = envelope.decode(envelope.encode([*text, rich], sender, to, "2026-11-27T11:00:00Z"))
    assert (env.sender, env.recipients, env.time) == (sender, tuple(to), "2026-11-27T11:00:00Z")
    assert [ET.tostring(el) for el in env.content] == [ET.tostring(el) for el in [*text, rich]]


def test_envelope_addressing_checks() -> None:
    env = envelope.decode(envelope.encode(body("x"), "alice@x.test", ["bob@x.test"], "t"))
    alice = _header("alice@x.test", "alice@x.test", "bob@x.test")
    envelope.check_addressing(env, alice, "alice@x.test", "bob@x.test", "bob@x.test")
    # alice reads her own capsule from her archive or a carbon
    envelope.check_addressing(env, alice, "alice@x.test", "bob@x.test", "alice@x.test")
    with pytest.raises(EnvelopeMismatch, match="forwarded or spoofed"):
        envelope.check_addressing(env, alice, "bob@x.test", "carol@x.test", "carol@x.test")
    with pytest.raises(EnvelopeMismatch, match="not among the envelope's recipients"):
        envelope.check_addressing(env, alice, "alice@x.test", "carol@x.test", "carol@x.test")
    with pytest.raises(EnvelopeMismatch, match="header sender"):
        envelope.check_addressing(env, _header("eve@x.test", "bob@x.test"), "eve@x.test",
                                  "bob@x.test", "bob@x.test")
    # the addressees are exactly the keyed recipients: carol keyed but not named
    with pytest.raises(EnvelopeMismatch, match="keyed recipients"):
        envelope.check_addressing(env, _header("alice@x.test", "bob@x.test", "carol@x.test"),
                                  "alice@x.test", "bob@x.test", "bob@x.test")
    # a room capsule needs the room named, and outside a room the room is an extra addressee
    room = envelope.decode(envelope.encode(body("x"), "alice@x.test",
                                           ["bob@x.test", "r@muc.x.test"], "t"))
    envelope.check_addressing(room, alice, "alice@x.test", "r@muc.x.test", "bob@x.test",
                              room="r@muc.x.test")
    with pytest.raises(EnvelopeMismatch, match="keyed recipients"):
        envelope.check_addressing(room, alice, "alice@x.test", "bob@x.test", "bob@x.test")
    with pytest.raises(EnvelopeMismatch, match="not addressed to the room"):
        envelope.check_addressing(env, alice, "alice@x.test", "r@muc.x.test", "bob@x.test",
                                  room="r@muc.x.test")


@pytest.mark.parametrize("data", [
    b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><envelope xmlns='urn:xmpp:sce:1'/>",
    b"not xml at all",
    b"<envelope xmlns='urn:other'/>",
    b"<envelope xmlns='urn:xmpp:sce:1'><content/><time stamp='t'/></envelope>",
    b"<envelope xmlns='urn:xmpp:sce:1'><content/><time stamp='t'/><to jid='b@x'/>"
    b"<from jid='a@x'/><from jid='m@x'/></envelope>",  # which sender? neither
    b"<envelope xmlns='urn:xmpp:sce:1'><content/><time stamp='t'/><time stamp='u'/>"
    b"<to jid='b@x'/><from jid='a@x'/></envelope>",
    b"<envelope xmlns='urn:xmpp:sce:1'><content/><content/><time stamp='t'/><to jid='b@x'/>"
    b"<from jid='a@x'/></envelope>",
    b"<envelope xmlns='urn:xmpp:sce:1'><content/><time stamp='t'/><to jid='b@x'/>"
    b"<from jid='a@x'/><extra/></envelope>",
    b"<envelope xmlns='urn:xmpp:sce:1'><content/><?pi data?><time stamp='t'/><to jid='b@x'/>"
    b"<from jid='a@x'/></envelope>",
    b"<envelope xmlns='urn:xmpp:sce:1'><content/><rpad/><rpad/><time stamp='t'/>"
    b"<to jid='b@x'/><from jid='a@x'/></envelope>",
], ids=["dtd", "not-xml", "other-ns", "no-to-from", "two-from", "two-time", "two-content",
        "foreign-part", "processing-instruction", "two-rpad"])
def test_bad_envelopes_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedCapsule):
        envelope.decode(data)


def test_padding_varies_the_length() -> None:
    sizes = {len(envelope.encode(body("same"), "a@x", ["b@x"], "t")) for _ in range(30)}
    assert len(sizes) > 5
