"""The crypto core of wire format v1: seal, verify and open capsules wrapped to session keys.

Pure: bytes in, bytes out. Per message a fresh message key, IV, nid and ephemeral X25519 key;
the message key is wrapped (AES-KW under an HKDF-SHA256 key from X25519) to every recipient's
session key and to the sender's own; the envelope is AES-256-GCM encrypted with the header
bytes as associated data; the signed bytes are signed as in v0 (capsule.signatures). Opening
verifies the signature before any private-key operation. Byte layout: README, "Protocol (wire
format v1)".
"""

from __future__ import annotations

import datetime as dt
import os
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from capsule import algorithms as alg
from capsule import signatures
from capsule.core import lp, new_message_key, parse_timestamp, utc_timestamp
from capsule.errors import (
    BadSignature,
    DecryptionFailed,
    InvalidSessionRecord,
    MalformedCapsule,
    NotAddressedToUs,
    SessionExpired,
)
from capsule.sessions import public_bytes, sid


@dataclass(frozen=True)
class KeyEntry:
    """The message key wrapped to one session key (named by its sid) of ``jid``."""

    jid: str
    sid: bytes
    wrapped: bytes


@dataclass(frozen=True)
class Header:
    sender: str
    cert: str  # fingerprint of the sender's signing certificate
    nid: bytes
    ts: str
    epk: bytes  # the message's ephemeral X25519 public key
    keys: tuple[KeyEntry, ...]
    iv: bytes


@dataclass(frozen=True)
class Capsule:
    header: Header
    payload: bytes  # AES-256-GCM ciphertext + tag of the envelope
    signature: bytes


@dataclass(frozen=True)
class Recipient:
    """A session key a capsule is sealed to: its owner's bare JID and its public key."""

    jid: str
    pub: bytes


def _sort_key(key: KeyEntry) -> tuple[bytes, bytes]:
    return key.jid.encode(), key.sid


def header_bytes(header: Header) -> bytes:
    """The AES-GCM associated data and signed-bytes prefix."""
    keys = sorted(header.keys, key=_sort_key)
    parts = [lp(alg.V1_VERSION_TAG), lp(header.sender.encode()), lp(header.cert.encode()),
             lp(header.nid), lp(header.ts.encode()), lp(header.epk), struct.pack(">I", len(keys))]
    for key in keys:
        parts += [lp(key.jid.encode()), lp(key.sid), lp(key.wrapped)]
    parts.append(lp(header.iv))
    return b"".join(parts)


def signed_bytes(capsule: Capsule) -> bytes:
    return header_bytes(capsule.header) + lp(capsule.payload)


def kek(shared: bytes, nid: bytes, epk: bytes, pub: bytes, jid: str) -> bytes:
    """The key-encryption key for one recipient session key."""
    info = lp(alg.WRAP_INFO) + lp(epk) + lp(pub) + lp(jid.encode())
    return HKDF(alg.WRAP_HASH, alg.KEK_BYTES, salt=nid, info=info).derive(shared)


def check_shape(capsule: Capsule) -> None:
    """Reject what no honest v1 sender produces, before any cryptography is spent on it."""
    h = capsule.header
    for name, value, size in (("nid", h.nid, alg.NID_BYTES), ("iv", h.iv, alg.IV_BYTES),
                              ("epk", h.epk, alg.X25519_BYTES)):
        if len(value) != size:
            raise MalformedCapsule(f"{name} must be {size} bytes, not {len(value)}")
    if not h.sender or "/" in h.sender or "@" not in h.sender:
        raise MalformedCapsule(f"sender is not a bare JID: {h.sender!r}")
    if len({(k.jid, k.sid) for k in h.keys}) != len(h.keys):
        raise MalformedCapsule("two <key>s name the same session key")
    if not any(k.jid == h.sender for k in h.keys):
        raise MalformedCapsule("a v1 capsule must hold a <key> for its sender")
    for k in h.keys:
        if len(k.sid) != alg.SID_BYTES or len(k.wrapped) != alg.WRAPPED_BYTES:
            raise MalformedCapsule("a <key> has a sid or wrapped key of the wrong size")
    if len(capsule.payload) < alg.TAG_BYTES:
        raise MalformedCapsule("payload is shorter than the GCM tag")
    parse_timestamp(h.ts)


def seal(envelope: bytes, *, sender: str, sender_cert: str,
         signing_key: signatures.SigningKey, recipients: Sequence[Recipient],
         now: dt.datetime | None = None, message_key: bytes | None = None) -> Capsule:
    """Encrypt ``envelope`` once, wrap its key to every session key (the sender's own among
    them: required), sign the result. ``message_key``: when the caller keeps it."""
    return seal_with(envelope, sender=sender, sender_cert=sender_cert, signing_key=signing_key,
                     recipients=recipients, ts=utc_timestamp(now),
                     message_key=message_key or new_message_key(),
                     iv=os.urandom(alg.IV_BYTES), nid=os.urandom(alg.NID_BYTES),
                     ephemeral=x25519.X25519PrivateKey.generate())


def seal_with(envelope: bytes, *, sender: str, sender_cert: str,
              signing_key: signatures.SigningKey, recipients: Sequence[Recipient], ts: str,
              message_key: bytes, iv: bytes, nid: bytes,
              ephemeral: x25519.X25519PrivateKey) -> Capsule:
    """:func:`seal` with its randomness given: for the test vectors only (README)."""
    signatures.kind(signing_key)
    if not any(r.jid == sender for r in recipients):
        raise ValueError("a v1 capsule must be sealed to the sender's own session key too")
    if any(len(r.pub) != alg.X25519_BYTES for r in recipients):
        raise InvalidSessionRecord(f"session public keys are {alg.X25519_BYTES} bytes")
    epk = public_bytes(ephemeral)
    entries: dict[tuple[str, bytes], KeyEntry] = {}
    for r in recipients:
        try:
            shared = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(r.pub))
        except ValueError:
            raise InvalidSessionRecord(f"{r.jid}'s session key is a low-order point") from None
        wrapped = aes_key_wrap(kek(shared, nid, epk, r.pub, r.jid), message_key)
        entry = KeyEntry(r.jid, sid(r.pub), wrapped)
        entries.setdefault((r.jid, entry.sid), entry)
    header = Header(sender=sender, cert=sender_cert, nid=nid, ts=ts, epk=epk,
                    keys=tuple(sorted(entries.values(), key=_sort_key)), iv=iv)
    associated = header_bytes(header)
    payload = AESGCM(message_key).encrypt(iv, envelope, associated)
    return Capsule(header, payload, signatures.sign(signing_key, associated + lp(payload)))


def verify(capsule: Capsule, signer: signatures.VerifyingKey) -> None:
    """Check the capsule's shape and signature; raises MalformedCapsule or BadSignature."""
    check_shape(capsule)
    if not signatures.valid(signer, capsule.signature, signed_bytes(capsule)):
        raise BadSignature(f"signature of the capsule from {capsule.header.sender} does not "
                           f"verify")


def unseal(capsule: Capsule, *, jid: str, sessions: Mapping[bytes, x25519.X25519PrivateKey],
           destroyed: Collection[bytes] = ()) -> bytes:
    """Unwrap our key entry with our session key and decrypt. Call only after :func:`verify`.

    ``sessions`` maps the sids of the session keys we hold to their private keys;
    ``destroyed`` names the ones we destroyed (reported as SessionExpired).
    """
    return unseal_with_key(capsule, jid=jid, sessions=sessions, destroyed=destroyed)[0]


def unseal_with_key(capsule: Capsule, *, jid: str,
                    sessions: Mapping[bytes, x25519.X25519PrivateKey],
                    destroyed: Collection[bytes] = ()) -> tuple[bytes, bytes]:
    """:func:`unseal`, also returning the message key (the receipt proof derives from it)."""
    h = capsule.header
    ours = [k for k in h.keys if k.jid == jid]
    entry = next((k for k in ours if k.sid in sessions), None)
    if entry is None:
        if any(k.sid in destroyed for k in ours):
            raise SessionExpired(f"the capsule from {h.sender} was sealed to a session key "
                                 f"of {jid} that has been destroyed")
        raise NotAddressedToUs(f"the capsule from {h.sender} holds no key for a session key "
                               f"of {jid}")
    private = sessions[entry.sid]
    try:
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(h.epk))
        key = aes_key_unwrap(kek(shared, h.nid, h.epk, public_bytes(private), jid), entry.wrapped)
    except (ValueError, InvalidUnwrap):
        raise DecryptionFailed("the message key could not be unwrapped") from None
    try:
        return AESGCM(key).decrypt(h.iv, capsule.payload, header_bytes(h)), key
    except InvalidTag:
        raise DecryptionFailed("the payload does not authenticate") from None
