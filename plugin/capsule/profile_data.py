"""What a profile holds (keys, certificates, pinned contacts, replay state) and its JSON form,
format 1's replay cache included."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa, x25519

from capsule import sessions, signatures
from capsule.core import parse_timestamp
from capsule.errors import CapsuleError, CorruptProfile
from capsule.replay import Entry, ReplayState


def _pem_key(key: signatures.SigningKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _load_signing_key(pem: str) -> signatures.SigningKey:
    key = serialization.load_pem_private_key(pem.encode(), None)
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise CorruptProfile("profile holds a signing key that is neither RSA nor Ed25519")
    return key


def _load_key(pem: str) -> rsa.RSAPrivateKey:
    # The key comes out of the profile's AES-GCM ciphertext, so it is the one we generated and
    # checked: validating it again (primality, ~0.1 s per RSA key) only made each bot's unlock
    # slow. Tampering needs the PIN-derived key, which opens the key anyway.
    key = serialization.load_pem_private_key(pem.encode(), None,
                                             unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CorruptProfile("profile holds a non-RSA key")
    return key


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class SessionKey:
    """One of our v1 session keys: the private X25519 key and its signed, published record."""

    private: x25519.X25519PrivateKey
    record: sessions.SessionRecord

    def to_json(self) -> dict[str, str]:
        raw = self.private.private_bytes(serialization.Encoding.Raw,
                                         serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption())
        r = self.record
        return {"key": b64(raw), "pub": b64(r.pub), "cert": r.cert, "created": r.created,
                "expires": r.expires, "signature": b64(r.signature)}

    @classmethod
    def from_json(cls, raw: dict[str, str]) -> SessionKey:
        private = x25519.X25519PrivateKey.from_private_bytes(
            base64.b64decode(raw["key"], validate=True))
        record = sessions.SessionRecord(base64.b64decode(raw["pub"], validate=True), raw["cert"],
                                        raw["created"], raw["expires"],
                                        base64.b64decode(raw["signature"], validate=True))
        if sessions.public_bytes(private) != record.pub:
            raise ValueError("a session key does not match its record")
        return cls(private, record)

    # read on every seal (Profile.current_sessions): parsed once
    @functools.cached_property
    def expires(self) -> int:
        return parse_timestamp(self.record.expires)

    @functools.cached_property
    def created(self) -> int:
        return parse_timestamp(self.record.created)


@dataclass
class PinnedContact:
    """A pinned contact: the certificates we verified for that JID."""

    sign: str  # PEM
    encrypt: str  # PEM
    pinned: str  # when first pinned or last changed, ISO 8601


@dataclass
class ProfileData:
    jid: str
    signing_key: signatures.SigningKey
    encryption_key: rsa.RSAPrivateKey
    email: str | None = None
    signing_cert: str | None = None
    encryption_cert: str | None = None
    ca_root: str | None = None
    crl: str | None = None
    ca_service: str | None = None  # the JID of `capsule-ca serve` that enrolled us (CRL updates)
    retired: list[tuple[str, rsa.RSAPrivateKey]] = field(default_factory=list)  # (cert PEM, key)
    retired_sign: list[str] = field(default_factory=list)  # our former signing certs (PEM)
    contacts: dict[str, PinnedContact] = field(default_factory=dict)
    replay: ReplayState = field(default_factory=ReplayState)
    secret: str = "unknown"  # strong | short | unknown (format 1): for `profile show`
    sessions: list[SessionKey] = field(default_factory=list)  # v1 session keys held
    destroyed: dict[str, int] = field(default_factory=dict)  # sid (base64) -> its expiry

    def to_json(self) -> dict[str, Any]:
        return {
            "jid": self.jid, "email": self.email,
            "signing_key": _pem_key(self.signing_key),
            "encryption_key": _pem_key(self.encryption_key),
            "signing_cert": self.signing_cert, "encryption_cert": self.encryption_cert,
            "ca_root": self.ca_root, "crl": self.crl, "ca_service": self.ca_service,
            "retired": [[cert, _pem_key(key)] for cert, key in self.retired],
            "retired_sign": self.retired_sign,
            "contacts": {j: vars(c) for j, c in self.contacts.items()},
            "replay": self.replay.to_json(int(time.time())), "secret": self.secret,
            "sessions": [key.to_json() for key in self.sessions], "destroyed": self.destroyed,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ProfileData:
        try:
            return cls(
                jid=raw["jid"], email=raw.get("email"),
                signing_key=_load_signing_key(raw["signing_key"]),
                encryption_key=_load_key(raw["encryption_key"]),
                signing_cert=raw.get("signing_cert"), encryption_cert=raw.get("encryption_cert"),
                ca_root=raw.get("ca_root"), crl=raw.get("crl"), ca_service=raw.get("ca_service"),
                retired=[(cert, _load_key(key)) for cert, key in raw.get("retired", [])],
                retired_sign=list(raw.get("retired_sign", [])),
                contacts={j: PinnedContact(**c) for j, c in raw.get("contacts", {}).items()},
                replay=(_replay_v1(raw.get("replay", []), raw.get("replay_horizon", ""))
                        if isinstance(raw.get("replay", []), list)
                        else ReplayState.from_json(raw["replay"])),
                secret=raw.get("secret", "unknown"),
                sessions=[SessionKey.from_json(k) for k in raw.get("sessions", [])],
                destroyed={str(k): int(v) for k, v in raw.get("destroyed", {}).items()},
            )
        except (KeyError, TypeError, ValueError, CapsuleError) as exc:
            raise CorruptProfile(f"profile content is damaged ({exc.__class__.__name__})") from None


def _replay_v1(pairs: list[list[str]], horizon: str) -> ReplayState:
    """Format 1's replay cache ("sender nid" -> ts, one global horizon): its horizon becomes a
    floor for every sender, never later than the clock at migration. Format 1 accepted
    unpadded stamps (2026-9-1T0:0:0Z), so they are read leniently here, and only here."""
    now = int(time.time())
    floor = min(_v1_time(horizon) or now, now) if horizon else 0
    state = ReplayState(floor=floor)
    entries = []
    for key, ts in pairs:
        sender, nid = key.split(" ")
        entries.append(Entry(sender, nid, _v1_time(ts) or now, ""))
    state.load(entries)
    return state


def _v1_time(ts: str) -> int | None:
    try:
        return int(dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
                   .timestamp())
    except ValueError:
        return None


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
