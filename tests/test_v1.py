"""Wire format v1's pure core: session records and capsules sealed to session keys, attacked.

Server-free: the X25519 session keys, Ed25519/RSA signing keys and envelopes are built here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa, x25519

from capsule import core, envelope, sessions, signatures, v1
from capsule.errors import (
    BadSignature,
    DecryptionFailed,
    InvalidSessionRecord,
    MalformedCapsule,
    NotAddressedToUs,
    SessionExpired,
)

A, B, C = "alice@x.test", "bob@x.test", "carol@x.test"
NOW = 1_800_000_000
SKEW = 300


@pytest.fixture(scope="module", params=["ed25519", "rsa"])
def signer(request: pytest.FixtureRequest) -> signatures.SigningKey:
    if request.param == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def session() -> dict[str, x25519.X25519PrivateKey]:
    return {jid: x25519.X25519PrivateKey.generate() for jid in (A, B, C)}


def env(text: str = "hi", to: tuple[str, ...] = (B, C)) -> bytes:
    el = ET.Element("{jabber:client}body")
    el.text = text
    return envelope.encode([el], A, list(to), core.utc_timestamp())


def seal(signer: signatures.SigningKey, session: dict[str, x25519.X25519PrivateKey],
         to: tuple[str, ...] = (B, C), text: str = "hi") -> v1.Capsule:
    recipients = [v1.Recipient(j, sessions.public_bytes(session[j])) for j in (*to, A)]
    return v1.seal(env(text, to), sender=A, sender_cert="ab" * 32, signing_key=signer,
                   recipients=recipients)


def open_as(capsule: v1.Capsule, signer: signatures.SigningKey, jid: str,
            key: x25519.X25519PrivateKey) -> envelope.Envelope:
    v1.verify(capsule, signer.public_key())
    return envelope.decode(v1.unseal(capsule, jid=jid, sessions={
        sessions.sid(sessions.public_bytes(key)): key}))


def test_round_trip_to_recipients_and_self(signer: signatures.SigningKey,
                                           session: dict[str, x25519.X25519PrivateKey]) -> None:
    capsule = seal(signer, session, text="secret plan")
    assert {k.jid for k in capsule.header.keys} == {A, B, C}
    for jid in (A, B, C):
        assert open_as(capsule, signer, jid, session[jid]).content[0].text == "secret plan"
    assert b"secret plan" not in capsule.payload


def test_fresh_ephemeral_key_nid_iv_and_wraps_per_message(
        signer: signatures.SigningKey, session: dict[str, x25519.X25519PrivateKey]) -> None:
    one, two = seal(signer, session), seal(signer, session)
    assert one.header.epk != two.header.epk
    assert one.header.nid != two.header.nid and one.header.iv != two.header.iv
    assert {k.wrapped for k in one.header.keys}.isdisjoint(k.wrapped for k in two.header.keys)


def _tamper(capsule: v1.Capsule, field: str) -> v1.Capsule:
    h = capsule.header
    flip = bytes([1]) + b"\0" * 15
    keys = list(h.keys)
    if field == "payload":
        return dataclasses.replace(capsule, payload=bytes([capsule.payload[0] ^ 1])
                                   + capsule.payload[1:])
    if field in ("jid", "sid", "wrapped"):
        k = keys[-1]  # carol's: the sender's own must stay
        entry: dict[str, Any] = {
            "jid": "mallory@x.test",
            "sid": bytes(a ^ b for a, b in zip(k.sid, flip, strict=True)),
            "wrapped": bytes([k.wrapped[0] ^ 1]) + k.wrapped[1:],
        }
        keys[-1] = dataclasses.replace(k, **{field: entry[field]})
        return dataclasses.replace(capsule, header=dataclasses.replace(h, keys=tuple(keys)))
    changed: dict[str, Any] = {"sender": "mallory@x.test", "cert": "cd" * 32, "ts": "2030-01-01T00:00:00Z",
               "nid": bytes(16), "iv": bytes(12), "epk": bytes([h.epk[0] ^ 1]) + h.epk[1:]}
    return dataclasses.replace(capsule, header=dataclasses.replace(h, **{field: changed[field]}))


@pytest.mark.parametrize("field", ["sender", "cert", "nid", "ts", "epk", "iv", "payload",
                                   "jid", "sid", "wrapped"])
def test_any_tampering_breaks_the_signature(signer: signatures.SigningKey,
                                            session: dict[str, x25519.X25519PrivateKey],
                                            field: str) -> None:
    capsule = seal(signer, session)
    bad = _tamper(capsule, field)
    if field == "sender":  # also no longer holds a key for its sender
        bad = dataclasses.replace(bad, header=dataclasses.replace(bad.header, keys=tuple(
            dataclasses.replace(k, jid="mallory@x.test") if k.jid == A else k
            for k in bad.header.keys)))
    with pytest.raises(BadSignature):
        v1.verify(bad, signer.public_key())


def test_gcm_and_wrap_bind_the_header_without_the_signature(
        signer: signatures.SigningKey, session: dict[str, x25519.X25519PrivateKey]) -> None:
    capsule = seal(signer, session)
    sid_b = sessions.sid(sessions.public_bytes(session[B]))
    for field in ("epk", "nid", "ts", "iv"):
        with pytest.raises(DecryptionFailed):
            v1.unseal(_tamper(capsule, field), jid=B, sessions={sid_b: session[B]})


def test_wrong_session_key_and_swapped_wraps_are_refused(
        signer: signatures.SigningKey, session: dict[str, x25519.X25519PrivateKey]) -> None:
    capsule = seal(signer, session)
    other = x25519.X25519PrivateKey.generate()
    with pytest.raises(NotAddressedToUs):  # a session key the capsule was not sealed to
        v1.unseal(capsule, jid=B, sessions={sessions.sid(sessions.public_bytes(other)): other})
    sid_b = sessions.sid(sessions.public_bytes(session[B]))
    with pytest.raises(DecryptionFailed):  # right sid, wrong private key
        v1.unseal(capsule, jid=B, sessions={sid_b: other})
    with pytest.raises(NotAddressedToUs):  # bob's session key, but as carol
        v1.unseal(capsule, jid=C, sessions={sid_b: session[B]})
    by_jid = {k.jid: k for k in capsule.header.keys}
    swapped = tuple(dataclasses.replace(k, wrapped=by_jid[C].wrapped) if k.jid == B
                    else dataclasses.replace(k, wrapped=by_jid[B].wrapped) if k.jid == C else k
                    for k in capsule.header.keys)
    bad = dataclasses.replace(capsule, header=dataclasses.replace(capsule.header, keys=swapped))
    with pytest.raises(DecryptionFailed):  # bob's slot holds carol's wrap (bound to her key)
        v1.unseal(bad, jid=B, sessions={sid_b: session[B]})


def test_destroyed_session_key_is_reported_as_expired(
        signer: signatures.SigningKey, session: dict[str, x25519.X25519PrivateKey]) -> None:
    capsule = seal(signer, session)
    sid_b = sessions.sid(sessions.public_bytes(session[B]))
    with pytest.raises(SessionExpired) as caught:
        v1.unseal(capsule, jid=B, sessions={}, destroyed={sid_b})
    assert caught.value.reason == "session-expired"


@pytest.mark.parametrize("damage", ["short-payload", "short-epk", "short-wrap", "short-sid",
                                    "no-sender-key", "duplicate-key", "long-nid", "bad-ts"])
def test_malformed_shapes_are_refused_before_crypto(
        signer: signatures.SigningKey, session: dict[str, x25519.X25519PrivateKey],
        damage: str) -> None:
    capsule = seal(signer, session)
    h = capsule.header
    k = h.keys[0]
    header = {
        "short-payload": h, "short-epk": dataclasses.replace(h, epk=h.epk[:31]),
        "short-wrap": dataclasses.replace(h, keys=(dataclasses.replace(k, wrapped=k.wrapped[:39]),
                                                   *h.keys[1:])),
        "short-sid": dataclasses.replace(h, keys=(dataclasses.replace(k, sid=k.sid[:15]),
                                                  *h.keys[1:])),
        "no-sender-key": dataclasses.replace(h, keys=tuple(x for x in h.keys if x.jid != A)),
        "duplicate-key": dataclasses.replace(h, keys=(*h.keys, h.keys[0])),
        "long-nid": dataclasses.replace(h, nid=h.nid + b"\0"),
        "bad-ts": dataclasses.replace(h, ts="2026-9-1T0:0:0Z"),
    }[damage]
    payload = capsule.payload[:15] if damage == "short-payload" else capsule.payload
    with pytest.raises(MalformedCapsule):
        v1.verify(v1.Capsule(header, payload, capsule.signature), signer.public_key())


def test_v0_and_v1_signatures_never_stand_for_each_other(
        signer: signatures.SigningKey, session: dict[str, x25519.X25519PrivateKey]) -> None:
    """The version tag leads both signed byte strings: a v1 capsule's signature does not verify
    as a v0 capsule with the same fields (and vice versa), so one cannot be recast as the other."""
    capsule = seal(signer, session)
    h = capsule.header
    as_v0 = core.Capsule(core.Header(h.sender, h.cert, h.nid, h.ts, tuple(
        core.KeyEntry(k.jid, k.sid.hex(), k.wrapped) for k in h.keys), h.iv),
        capsule.payload, capsule.signature)
    with pytest.raises(BadSignature):
        core.verify(as_v0, signer.public_key())
    assert v1.signed_bytes(capsule).startswith(core.lp(b"urn:capsule:1"))
    enc = rsa.generate_private_key(65537, 2048)
    v0 = core.seal(env(), sender=A, sender_cert="ab" * 32, signing_key=signer,
                   recipients=[core.Recipient(B, "11" * 32, enc.public_key())])
    core.verify(v0, signer.public_key())  # v0 signed with either key type
    recast = v1.Capsule(v1.Header(A, v0.header.cert, v0.header.nid, v0.header.ts, bytes(32), tuple(
        v1.KeyEntry(k.jid, bytes(16), k.wrapped) for k in v0.header.keys), v0.header.iv),
        v0.payload, v0.signature)
    with pytest.raises((BadSignature, MalformedCapsule)):
        v1.verify(recast, signer.public_key())


def test_low_order_session_key_is_refused_when_sealing(signer: signatures.SigningKey) -> None:
    own = x25519.X25519PrivateKey.generate()
    with pytest.raises(InvalidSessionRecord):
        v1.seal(env(), sender=A, sender_cert="ab" * 32, signing_key=signer,
                recipients=[v1.Recipient(A, sessions.public_bytes(own)),
                            v1.Recipient(B, bytes(32))])


def test_seal_refuses_without_the_senders_own_session_key(
        signer: signatures.SigningKey, session: dict[str, x25519.X25519PrivateKey]) -> None:
    with pytest.raises(ValueError, match="own"):
        v1.seal(env(), sender=A, sender_cert="ab" * 32, signing_key=signer,
                recipients=[v1.Recipient(B, sessions.public_bytes(session[B]))])


# -- session records ---------------------------------------------------------------------------

def record(signer: signatures.SigningKey, jid: str = B, created: int = NOW,
           lifetime: int = 48 * 3600) -> sessions.SessionRecord:
    return sessions.make_record(jid, "ab" * 32, signer, x25519.X25519PrivateKey.generate(),
                                created, lifetime)


def test_a_valid_record_is_accepted(signer: signatures.SigningKey) -> None:
    r = record(signer)
    sessions.check(r, B, "ab" * 32, signer.public_key(), NOW + 60, SKEW)
    assert r.expires == core.utc_timestamp(dt.datetime.fromtimestamp(NOW + 48 * 3600, dt.UTC))


@pytest.mark.parametrize("attack", ["other-identity", "other-jid", "expired", "future",
                                    "too-long", "other-cert", "forged-expiry", "short-pub"])
def test_hostile_session_records_are_refused(signer: signatures.SigningKey, attack: str) -> None:
    key = signer.public_key()
    r = record(signer)
    jid, cert, now = B, "ab" * 32, NOW + 60
    if attack == "other-identity":
        r = record(ed25519.Ed25519PrivateKey.generate())
    elif attack == "other-jid":
        jid = C  # bob's record republished on carol's node
    elif attack == "expired":
        now = NOW + 48 * 3600
    elif attack == "future":
        now = NOW - SKEW - 1
    elif attack == "too-long":
        r = sessions.make_record(B, cert, signer, x25519.X25519PrivateKey.generate(), NOW,
                                 7 * 86400)
        r = dataclasses.replace(r, expires="2027-12-31T00:00:00Z")
    elif attack == "other-cert":
        cert = "cd" * 32
    elif attack == "forged-expiry":
        r = dataclasses.replace(r, expires="2030-01-01T00:00:00Z")
    elif attack == "short-pub":
        r = dataclasses.replace(r, pub=r.pub[:31])
    with pytest.raises(InvalidSessionRecord):
        sessions.check(r, jid, cert, key, now, SKEW)


def test_select_keeps_every_valid_record_newest_first(signer: signatures.SigningKey) -> None:
    """One record per device: all valid ones are wrapped to; forged, repeated and surplus
    records are not."""
    phone, tablet = record(signer, created=NOW - 3600), record(signer, created=NOW)
    forged = record(ed25519.Ed25519PrivateKey.generate(), created=NOW + 60)
    valid, refused = sessions.select([phone, forged, tablet, phone], B, "ab" * 32,
                                     signer.public_key(), NOW + 120, SKEW)
    assert valid == [tablet, phone] and len(refused) == 1
    assert sessions.select([forged], B, "ab" * 32, signer.public_key(), NOW, SKEW)[0] == []
    many = [record(signer, created=NOW - i) for i in range(12)]
    assert len(sessions.select(many, B, "ab" * 32, signer.public_key(), NOW, SKEW)[0]) == 8


def test_a_capsule_to_two_devices_opens_on_each(signer: signatures.SigningKey,
                                                session: dict[str, x25519.X25519PrivateKey]
                                                ) -> None:
    tablet = x25519.X25519PrivateKey.generate()
    recipients = [v1.Recipient(B, sessions.public_bytes(session[B])),
                  v1.Recipient(B, sessions.public_bytes(tablet)),
                  v1.Recipient(A, sessions.public_bytes(session[A]))]
    capsule = v1.seal(env(to=(B,)), sender=A, sender_cert="ab" * 32, signing_key=signer,
                      recipients=recipients)
    for key in (session[B], tablet):
        assert open_as(capsule, signer, B, key).content[0].text == "hi"


def test_make_record_refuses_a_lifetime_beyond_the_maximum(signer: signatures.SigningKey) -> None:
    with pytest.raises(ValueError):
        record(signer, lifetime=7 * 86400 + 1)
