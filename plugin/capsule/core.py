"""The crypto core of wire format v0: seal, verify and open capsules. Pure: bytes in, bytes out.

Sealing: a fresh 32-byte AES-256-GCM key and 12-byte IV per message; the key wrapped with
RSA-OAEP(SHA-256) for every recipient's encryption key (the sender's own included); the
payload encrypted with the header bytes as associated data; a signature over the signed
bytes (RSA-PSS(SHA-256) or Ed25519, after the signing key: capsule.signatures). Opening
verifies the signature *before* any private-key operation.

Signed bytes (see README, "Protocol"): every field as a 4-byte big-endian length followed by
its bytes, in this order: version tag, sender, sender cert fingerprint, nid, ts, number of keys
(4-byte big-endian), then for each key sorted by (jid, cert): jid, cert, wrapped key; then iv,
then (signed bytes only) the ciphertext. The header bytes (everything before the ciphertext)
are the AES-GCM associated data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from capsule import algorithms as alg
from capsule import signatures
from capsule.errors import (
    BadSignature,
    DecryptionFailed,
    MalformedCapsule,
    NotAddressedToUs,
)


@dataclass(frozen=True)
class KeyEntry:
    """The message key wrapped for one encryption certificate."""

    jid: str
    cert: str  # SHA-256 fingerprint of the DER certificate, lower-case hex
    wrapped: bytes


@dataclass(frozen=True)
class Header:
    sender: str
    cert: str  # fingerprint of the sender's signing certificate
    nid: bytes
    ts: str
    keys: tuple[KeyEntry, ...]
    iv: bytes


@dataclass(frozen=True)
class Capsule:
    """A sealed capsule as carried on the wire (see capsule.stanza)."""

    header: Header
    payload: bytes  # AES-256-GCM ciphertext + tag of the envelope
    signature: bytes


@dataclass(frozen=True)
class Recipient:
    """Someone a capsule is sealed for: bare JID, encryption cert fingerprint, its public key."""

    jid: str
    cert: str
    public_key: rsa.RSAPublicKey


def fingerprint(cert_der: bytes) -> str:
    """SHA-256 of a DER certificate, lower-case hex: how capsules name certificates."""
    return hashlib.sha256(cert_der).hexdigest()


def cert_fingerprint(cert: x509.Certificate) -> str:
    """:func:`fingerprint` of a parsed certificate."""
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def pem_fingerprint(pem: bytes) -> str:
    """:func:`fingerprint` of a PEM certificate (raises ValueError if it is not one)."""
    return cert_fingerprint(x509.load_pem_x509_certificate(pem))


def utc_timestamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z", re.ASCII)


def parse_timestamp(ts: str) -> int:
    """Seconds since the epoch of a capsule ``ts``: see :func:`timestamp_datetime`."""
    return int(timestamp_datetime(ts).timestamp())


def timestamp_datetime(ts: str) -> dt.datetime:
    """A capsule ``ts`` as an aware UTC datetime: exactly ``YYYY-MM-DDTHH:MM:SSZ``, else
    MalformedCapsule (strptime alone accepts unpadded fields, which sort wrongly, and costs a
    locale look-up per call)."""
    if not _TS.fullmatch(ts):
        raise MalformedCapsule(f"bad timestamp {ts!r}")
    try:
        return dt.datetime(int(ts[0:4]), int(ts[5:7]), int(ts[8:10]), int(ts[11:13]),
                           int(ts[14:16]), int(ts[17:19]), tzinfo=dt.UTC)
    except ValueError:
        raise MalformedCapsule(f"bad timestamp {ts!r}") from None


def lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def header_bytes(header: Header) -> bytes:
    """The deterministic encoding of the header: AES-GCM associated data and signed-bytes prefix."""
    keys = sorted(header.keys, key=lambda k: (k.jid, k.cert))
    parts = [
        lp(alg.VERSION_TAG),
        lp(header.sender.encode()),
        lp(header.cert.encode()),
        lp(header.nid),
        lp(header.ts.encode()),
        struct.pack(">I", len(keys)),
    ]
    for key in keys:
        parts += [lp(key.jid.encode()), lp(key.cert.encode()), lp(key.wrapped)]
    parts.append(lp(header.iv))
    return b"".join(parts)


def signed_bytes(capsule: Capsule) -> bytes:
    return header_bytes(capsule.header) + lp(capsule.payload)


def check_shape(capsule: Capsule) -> None:
    """Reject what no honest sender produces, before any cryptography is spent on it."""
    h = capsule.header
    if len(h.nid) != alg.NID_BYTES:
        raise MalformedCapsule(f"nid must be {alg.NID_BYTES} bytes, not {len(h.nid)}")
    if len(h.iv) != alg.IV_BYTES:
        raise MalformedCapsule(f"iv must be {alg.IV_BYTES} bytes, not {len(h.iv)}")
    if not h.keys:
        raise MalformedCapsule("capsule has no <key>")
    if len(capsule.payload) < alg.TAG_BYTES:
        raise MalformedCapsule("payload is shorter than the GCM tag")
    if not h.sender or "/" in h.sender or "@" not in h.sender:
        raise MalformedCapsule(f"sender is not a bare JID: {h.sender!r}")
    parse_timestamp(h.ts)


def seal(
    envelope: bytes,
    *,
    sender: str,
    sender_cert: str,
    signing_key: signatures.SigningKey,
    recipients: Sequence[Recipient],
    now: dt.datetime | None = None,
    key: bytes | None = None,
) -> Capsule:
    """Encrypt ``envelope`` once, wrap its key for every recipient, sign the result.

    ``key``: the message key, when the caller keeps it (see :func:`new_message_key`)."""
    if not recipients:
        raise ValueError("seal needs at least one recipient")
    signatures.kind(signing_key)  # TypeError before any work for a key of another type
    key = key or new_message_key()
    if len(key) != alg.MESSAGE_KEY_BYTES:
        raise ValueError(f"a message key is {alg.MESSAGE_KEY_BYTES} bytes")
    iv = os.urandom(alg.IV_BYTES)
    seen: set[tuple[str, str]] = set()
    entries = []
    for r in recipients:
        if (r.jid, r.cert) in seen:
            continue
        seen.add((r.jid, r.cert))
        entries.append(KeyEntry(r.jid, r.cert, r.public_key.encrypt(key, alg.oaep())))
    header = Header(
        sender=sender,
        cert=sender_cert,
        nid=os.urandom(alg.NID_BYTES),
        ts=utc_timestamp(now),
        keys=tuple(sorted(entries, key=lambda k: (k.jid, k.cert))),
        iv=iv,
    )
    payload = AESGCM(key).encrypt(iv, envelope, header_bytes(header))
    unsigned = Capsule(header, payload, b"")
    signature = signatures.sign(signing_key, signed_bytes(unsigned))
    return Capsule(header, payload, signature)


def new_message_key() -> bytes:
    """A fresh AES-256-GCM message key (either wire format)."""
    return AESGCM.generate_key(bit_length=alg.MESSAGE_KEY_BYTES * 8)


def verify(capsule: Capsule, signer: signatures.VerifyingKey) -> None:
    """Check the capsule's shape and signature; raises MalformedCapsule or BadSignature."""
    check_shape(capsule)
    if not signatures.valid(signer, capsule.signature, signed_bytes(capsule)):
        raise BadSignature(
            f"signature of the capsule from {capsule.header.sender} does not verify")


def unseal(
    capsule: Capsule,
    *,
    jid: str,
    certs: dict[str, rsa.RSAPrivateKey],
) -> bytes:
    """Unwrap our key entry and decrypt the envelope. Call only after :func:`verify`.

    ``certs`` maps our encryption-certificate fingerprints (current and retired) to their keys.
    """
    return unseal_with_key(capsule, jid=jid, certs=certs)[0]


def unseal_with_key(
    capsule: Capsule,
    *,
    jid: str,
    certs: dict[str, rsa.RSAPrivateKey],
) -> tuple[bytes, bytes]:
    """:func:`unseal`, also returning the message key (the receipt proof derives from it)."""
    entry = next(
        (k for k in capsule.header.keys if k.jid == jid and k.cert in certs), None
    )
    if entry is None:
        raise NotAddressedToUs(f"the capsule from {capsule.header.sender} holds no key for {jid}")
    try:
        key = certs[entry.cert].decrypt(entry.wrapped, alg.oaep())
    except ValueError:
        raise DecryptionFailed("the message key could not be unwrapped") from None
    if len(key) != alg.MESSAGE_KEY_BYTES:
        raise DecryptionFailed("the unwrapped message key has the wrong size")
    try:
        plain = AESGCM(key).decrypt(capsule.header.iv, capsule.payload,
                                    header_bytes(capsule.header))
    except InvalidTag:
        raise DecryptionFailed("the payload does not authenticate") from None
    return plain, key
