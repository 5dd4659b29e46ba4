"""Session keys of wire format v1: X25519 key pairs whose signed public records are published
on PEP (README, "Protocol (wire format v1)"). Pure: records in, verdicts out; no I/O.

A record binds the owner's bare JID (not written in it: the PEP service it came from), the
signing certificate, the public key and its validity; senders wrap message keys only to valid
ones, so a record from another identity, for another JID, expired or too long-lived is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from capsule import algorithms as alg
from capsule import signatures
from capsule.core import lp, parse_timestamp, utc_timestamp
from capsule.errors import InvalidSessionRecord, MalformedCapsule


@dataclass(frozen=True)
class SessionRecord:
    """A published session key: ``<session pub cert created expires>signature</session>``.

    Each device of an account holds its own session keys; the account's PEP item carries the
    newest record of each device, and senders wrap to all of them."""

    pub: bytes  # raw X25519 public key
    cert: str  # fingerprint of the owner's signing certificate
    created: str  # YYYY-MM-DDTHH:MM:SSZ
    expires: str
    signature: bytes

    @property
    def sid(self) -> bytes:
        return sid(self.pub)


def sid(pub: bytes) -> bytes:
    """A session key's name in capsules: the first 16 bytes of SHA-256 of its public key."""
    return hashlib.sha256(pub).digest()[:alg.SID_BYTES]


def public_bytes(key: x25519.X25519PrivateKey | x25519.X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, x25519.X25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def contributory(pub: bytes) -> bool:
    """Whether X25519 with ``pub`` gives a secret that depends on our key: RFC 7748 section 6.1
    (a low-order point, e.g. 32 zero bytes, gives the all-zero secret whatever we hold)."""
    try:
        _PROBE.exchange(x25519.X25519PublicKey.from_public_bytes(pub))
    except ValueError:  # OpenSSL refuses the all-zero shared secret
        return False
    return True


_PROBE = x25519.X25519PrivateKey.generate()  # any key: low-order points give zero for all


def session_bytes(jid: str, record: SessionRecord) -> bytes:
    """What the owner signs: tag, owner JID, signing cert, public key, created, expires."""
    return b"".join([lp(alg.SESSION_TAG), lp(jid.encode()), lp(record.cert.encode()),
                     lp(record.pub), lp(record.created.encode()), lp(record.expires.encode())])


def make_record(jid: str, cert: str, signing_key: signatures.SigningKey,
                key: x25519.X25519PrivateKey, created: int,
                lifetime: int = alg.SESSION_LIFETIME_S) -> SessionRecord:
    """Sign the record of ``key`` for ``jid``, valid from ``created`` (epoch seconds)."""
    if not 0 < lifetime <= alg.SESSION_MAX_LIFETIME_S:
        raise ValueError(f"a session lifetime must be 1..{alg.SESSION_MAX_LIFETIME_S} s")
    unsigned = SessionRecord(public_bytes(key), cert, _stamp(created),
                             _stamp(created + lifetime), b"")
    signature = signatures.sign(signing_key, session_bytes(jid, unsigned))
    return SessionRecord(unsigned.pub, cert, unsigned.created, unsigned.expires, signature)


def check(record: SessionRecord, jid: str, cert: str, signer: signatures.VerifyingKey,
          now: int, skew: int) -> None:
    """Raise InvalidSessionRecord unless ``record`` is valid for ``jid`` whose verified
    signing certificate has fingerprint ``cert`` and key ``signer``, at ``now``."""
    if len(record.pub) != alg.X25519_BYTES:
        raise InvalidSessionRecord(f"{jid}'s session key is {len(record.pub)} bytes, "
                                   f"not {alg.X25519_BYTES}")
    if not contributory(record.pub):
        raise InvalidSessionRecord(f"{jid}'s session key is a low-order point")
    if record.cert != cert:
        raise InvalidSessionRecord(f"{jid}'s session record names another signing certificate")
    try:
        created, expires = parse_timestamp(record.created), parse_timestamp(record.expires)
    except MalformedCapsule as exc:
        raise InvalidSessionRecord(f"{jid}'s session record: {exc}") from None
    if not signatures.valid(signer, record.signature, session_bytes(jid, record)):
        raise InvalidSessionRecord(f"{jid}'s session record is not signed by {jid}")
    if created > now + skew:
        raise InvalidSessionRecord(f"{jid}'s session record is dated in the future")
    if now >= expires:
        raise InvalidSessionRecord(f"{jid}'s session record expired at {record.expires}")
    if not 0 < expires - created <= alg.SESSION_MAX_LIFETIME_S:
        raise InvalidSessionRecord(f"{jid}'s session record claims a lifetime of "
                                   f"{expires - created} s")


def select(records: Iterable[SessionRecord], jid: str, cert: str,
           signer: signatures.VerifyingKey, now: int, skew: int
           ) -> tuple[list[SessionRecord], list[InvalidSessionRecord]]:
    """The valid records (one per device of the account, normally), newest first, at most
    alg.SESSIONS_PUBLISHED and one per public key; with why the others were refused."""
    valid: dict[bytes, SessionRecord] = {}
    refused = []
    for record in records:
        try:
            check(record, jid, cert, signer, now, skew)
        except InvalidSessionRecord as exc:
            refused.append(exc)
            continue
        valid.setdefault(record.pub, record)
    ordered = sorted(valid.values(), key=lambda r: (created(r), r.pub), reverse=True)
    return ordered[:alg.SESSIONS_PUBLISHED], refused


def created(record: SessionRecord) -> int:
    return parse_timestamp(record.created)


def expires(record: SessionRecord) -> int:
    return parse_timestamp(record.expires)


def _stamp(seconds: int) -> str:
    return utc_timestamp(dt.datetime.fromtimestamp(seconds, dt.UTC))
