"""The local profile: one file per account, AES-256-GCM under an Argon2id key from the PIN.

File layout (version 1)::

    CAPSULE-PROFILE <header JSON>\\n<AES-256-GCM ciphertext + tag>

The header names the format version, the KDF and its parameters, the salt and the nonce; the
whole first line is the associated data, so changing a parameter breaks the tag. Saves are
atomic (temp file in the same directory, fsync, rename, fsync of the directory): a crash
leaves the old or the new profile, never a mix.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.x509.oid import NameOID

from capsule import algorithms as alg
from capsule.core import cert_fingerprint
from capsule.errors import CorruptProfile, ProfileError, ReplayedCapsule, UnsupportedVersion, WrongPin
from capsule.files import write_private
from capsule.jids import bare_jid
from capsule_ca.xmppaddr import ID_ON_XMPPADDR, cert_jids

MAGIC = b"CAPSULE-PROFILE "
FORMAT_VERSION = 1
REPLAY_CACHE_MAX = 20000
PIN_ENV = "CAPSULE_PIN"


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters, stored in the file header (RFC 9106's second recommendation)."""

    memory_cost: int = 65536  # KiB
    iterations: int = 3
    lanes: int = 4

    def derive(self, pin: str, salt: bytes) -> bytes:
        return Argon2id(salt=salt, length=32, iterations=self.iterations, lanes=self.lanes,
                        memory_cost=self.memory_cost).derive(pin.encode())


FAST_KDF = KdfParams(memory_cost=8192, iterations=1, lanes=1)  # for tests and bulk bots


def check_pin(pin: str) -> str:
    """A PIN of 6+ digits, or a passphrase of 8+ characters."""
    if pin.isdigit() and len(pin) >= 6:
        return pin
    if not pin.isdigit() and len(pin) >= 8:
        return pin
    raise ProfileError("the PIN must be 6 or more digits, or a passphrase of 8 or more characters")


def _pem_key(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _load_key(pem: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CorruptProfile("profile holds a non-RSA key")
    return key


@dataclass
class Contact:
    """A pinned contact: the certificates we verified for that JID."""

    sign: str  # PEM
    encrypt: str  # PEM
    pinned: str  # when first pinned or last changed, ISO 8601


@dataclass
class ProfileData:
    jid: str
    signing_key: rsa.RSAPrivateKey
    encryption_key: rsa.RSAPrivateKey
    email: str | None = None
    signing_cert: str | None = None
    encryption_cert: str | None = None
    ca_root: str | None = None
    crl: str | None = None
    ca_service: str | None = None  # the JID of `capsule-ca serve` that enrolled us (CRL updates)
    retired: list[tuple[str, rsa.RSAPrivateKey]] = field(default_factory=list)  # (cert PEM, key)
    retired_sign: list[str] = field(default_factory=list)  # our former signing certs (PEM)
    contacts: dict[str, Contact] = field(default_factory=dict)
    replay: OrderedDict[str, str] = field(default_factory=OrderedDict)  # "sender nid" -> ts
    replay_horizon: str = ""

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
            "replay": list(self.replay.items()), "replay_horizon": self.replay_horizon,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ProfileData:
        try:
            return cls(
                jid=raw["jid"], email=raw.get("email"),
                signing_key=_load_key(raw["signing_key"]),
                encryption_key=_load_key(raw["encryption_key"]),
                signing_cert=raw.get("signing_cert"), encryption_cert=raw.get("encryption_cert"),
                ca_root=raw.get("ca_root"), crl=raw.get("crl"), ca_service=raw.get("ca_service"),
                retired=[(cert, _load_key(key)) for cert, key in raw.get("retired", [])],
                retired_sign=list(raw.get("retired_sign", [])),
                contacts={j: Contact(**c) for j, c in raw.get("contacts", {}).items()},
                replay=OrderedDict((k, v) for k, v in raw.get("replay", [])),
                replay_horizon=raw.get("replay_horizon", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptProfile(f"profile content is damaged ({exc.__class__.__name__})") from None


class Profile:
    """An unlocked profile. The derived key stays in memory so saves need no Argon2 run."""

    def __init__(self, path: Path, data: ProfileData, key: bytes, salt: bytes, kdf: KdfParams):
        self.path = path
        self.data = data
        self._key = key
        self._salt = salt
        self._kdf = kdf
        self._decryption_keys: tuple[list[Any], dict[str, rsa.RSAPrivateKey]] | None = None

    def __repr__(self) -> str:  # never show keys
        return f"<Profile {self.data.jid} at {self.path}>"

    # -- creation, loading, saving ----------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], jid: str, pin: str, email: str | None = None,
               key_bits: int = alg.DEFAULT_RSA_BITS, kdf: KdfParams | None = None) -> Profile:
        """Generate signing and encryption key pairs locally and write a new profile."""
        target = Path(path)
        if target.exists():
            raise ProfileError(f"{target} exists; refusing to overwrite a profile")
        try:
            jid = bare_jid(jid)
        except ValueError as exc:
            raise ProfileError(str(exc)) from None
        if key_bits not in alg.ACCEPTED_RSA_BITS:
            raise ProfileError(f"RSA key size must be one of {alg.ACCEPTED_RSA_BITS}")
        check_pin(pin)
        kdf = kdf or KdfParams()
        salt = os.urandom(16)
        data = ProfileData(
            jid=jid, email=email,
            signing_key=rsa.generate_private_key(65537, key_bits),
            encryption_key=rsa.generate_private_key(65537, key_bits),
        )
        profile = cls(target, data, kdf.derive(pin, salt), salt, kdf)
        profile.save()
        return profile

    @classmethod
    def load(cls, path: str | os.PathLike[str], pin: str) -> Profile:
        target = Path(path)
        try:
            raw = target.read_bytes()
        except FileNotFoundError:
            raise ProfileError(f"no profile at {target} (create one with `capsule profile init`)"
                               ) from None
        except OSError as exc:
            raise ProfileError(f"cannot read {target}: {exc.strerror}") from None
        line, sep, ciphertext = raw.partition(b"\n")
        if not raw.startswith(MAGIC) or not sep:
            raise CorruptProfile(f"{target} is not a Capsule profile or is truncated")
        try:
            header = json.loads(line[len(MAGIC):])
            version = header["version"]
        except (ValueError, KeyError, TypeError):
            raise CorruptProfile(f"{target} has a damaged header") from None
        if version != FORMAT_VERSION:
            raise UnsupportedVersion(
                f"{target} is profile format {version}; this Capsule reads {FORMAT_VERSION}")
        try:
            k = header["kdf"]
            if k["name"] != "argon2id" or header["cipher"] != "AES-256-GCM":
                raise UnsupportedVersion(f"{target} uses {k['name']}/{header['cipher']}")
            kdf = KdfParams(int(k["memory_cost"]), int(k["iterations"]), int(k["lanes"]))
            salt = base64.b64decode(k["salt"], validate=True)
            nonce = base64.b64decode(header["nonce"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise CorruptProfile(f"{target} has a damaged header") from None
        if len(ciphertext) < alg.TAG_BYTES:
            raise CorruptProfile(f"{target} is truncated")
        key = kdf.derive(pin, salt)
        try:
            plain = AESGCM(key).decrypt(nonce, ciphertext, line)
        except InvalidTag:
            raise WrongPin(f"wrong PIN for {target} (or the file was altered)") from None
        try:
            content = json.loads(plain)
        except ValueError:
            raise CorruptProfile(f"{target} decrypts to damaged content") from None
        return cls(target, ProfileData.from_json(content), key, salt, kdf)

    def save(self) -> None:
        """Encrypt under a fresh nonce and replace the file atomically."""
        nonce = os.urandom(alg.IV_BYTES)
        header = {
            "version": FORMAT_VERSION, "cipher": "AES-256-GCM",
            "kdf": {"name": "argon2id", "salt": base64.b64encode(self._salt).decode(),
                    "memory_cost": self._kdf.memory_cost, "iterations": self._kdf.iterations,
                    "lanes": self._kdf.lanes},
            "nonce": base64.b64encode(nonce).decode(),
        }
        line = MAGIC + json.dumps(header, sort_keys=True).encode()
        body = AESGCM(self._key).encrypt(nonce, json.dumps(self.data.to_json()).encode(), line)
        write_private(self.path, line + b"\n" + body)

    def change_pin(self, new_pin: str, kdf: KdfParams | None = None) -> None:
        check_pin(new_pin)
        self._kdf = kdf or self._kdf
        self._salt = os.urandom(16)
        self._key = self._kdf.derive(new_pin, self._salt)
        self.save()

    # -- certificates -----------------------------------------------------------
    def csr(self, usage: str) -> bytes:
        """A CSR for our ``sign`` or ``encrypt`` key, asking for our JID as id-on-xmppAddr."""
        key = {"sign": self.data.signing_key, "encrypt": self.data.encryption_key}[usage]
        jid = self.data.jid.encode()
        der_jid = b"\x0c" + _der_length(len(jid)) + jid
        names: list[x509.GeneralName] = [x509.OtherName(ID_ON_XMPPADDR, der_jid)]
        if self.data.email:
            names.append(x509.RFC822Name(self.data.email))
        return (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.data.jid)]))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )

    def import_cert(self, pem: bytes) -> str:
        """Store an issued certificate (matched to our key) or, if self-signed CA, the root."""
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise ProfileError("not a PEM certificate") from None
        text = pem.decode()
        if cert.issuer == cert.subject:
            self.data.ca_root = text
            return "ca"
        if self.data.jid not in cert_jids(cert):
            raise ProfileError(f"the certificate is not for {self.data.jid}")
        numbers = cert.public_key().public_numbers()  # type: ignore[union-attr]
        if numbers == self.data.signing_key.public_key().public_numbers():
            self.data.signing_cert = text
            return "sign"
        if numbers == self.data.encryption_key.public_key().public_numbers():
            self.data.encryption_cert = text
            return "encrypt"
        raise ProfileError("the certificate matches neither of this profile's keys")

    def rotate_keys(self, key_bits: int = alg.DEFAULT_RSA_BITS) -> None:
        """New key pairs; the old encryption key and signing certificate are kept, so old
        capsules (and our own old ones in the archive) stay readable and verifiable."""
        if self.data.encryption_cert:
            self.data.retired.append((self.data.encryption_cert, self.data.encryption_key))
        if self.data.signing_cert:
            self.data.retired_sign.append(self.data.signing_cert)
        self.data.encryption_key = rsa.generate_private_key(65537, key_bits)
        self.data.signing_key = rsa.generate_private_key(65537, key_bits)
        self.data.encryption_cert = self.data.signing_cert = None

    def decryption_keys(self) -> dict[str, rsa.RSAPrivateKey]:
        """Our encryption-certificate fingerprints (current and retired) -> private keys."""
        pairs = [(self.data.encryption_cert, self.data.encryption_key), *self.data.retired]
        if self._decryption_keys is None or self._decryption_keys[0] != pairs:
            keys = {cert_fingerprint(x509.load_pem_x509_certificate(pem.encode())): key
                    for pem, key in pairs if pem}
            self._decryption_keys = (pairs, keys)
        return self._decryption_keys[1]

    def ready(self) -> bool:
        return bool(self.data.signing_cert and self.data.encryption_cert and self.data.ca_root)

    # -- replay cache -----------------------------------------------------------
    def remember(self, sender: str, nid: bytes, ts: str) -> None:
        """Record (sender, nid) or raise ReplayedCapsule. Bounded: evictions raise a horizon."""
        entry = f"{sender} {nid.hex()}"
        if entry in self.data.replay:
            raise ReplayedCapsule(f"capsule {nid.hex()[:8]}… from {sender} was already received")
        if self.data.replay_horizon and ts <= self.data.replay_horizon:
            raise ReplayedCapsule(
                f"capsule from {sender} dated {ts} is older than the replay window")
        self.data.replay[entry] = ts
        while len(self.data.replay) > REPLAY_CACHE_MAX:
            _, old_ts = self.data.replay.popitem(last=False)
            self.data.replay_horizon = max(self.data.replay_horizon, old_ts)


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw



def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
