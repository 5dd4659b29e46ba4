"""The local profile: one file per account, AES-256-GCM under an Argon2id key from the PIN.

File layout (version 3; versions 1 and 2 are read, 1 is rewritten as 2 at the next save and
2 as 3 at a change of PIN)::

    CAPSULE-PROFILE <header JSON>\n<AES-256-GCM ciphertext + tag>

The header names the format version, the KDF and its parameters (bounded before use), the
salt, the key salt (format 3), the nonce and whether a key file is needed; the whole first line
is the associated data, so changing a parameter breaks the tag. With a key file the profile key
is derived from the PIN *and* 32 random bytes kept elsewhere: the file alone cannot be
brute-forced. Format 3 derives the key over a salt of the profile's own after Argon2id, so
profiles may share Argon2id's salt (one unlock per process, capsule.profile_key) and still
each have a key of their own. Saves are atomic
(temp file, fsync, rename, fsync of the directory) under the profile lock; replay entries
accepted between saves are in the journal beside it (capsule.journal).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from capsule import algorithms as alg
from capsule import journal, sessions, signatures
from capsule.core import cert_fingerprint
from capsule.errors import (
    CorruptProfile,
    ProfileChanged,
    ProfileError,
    ProfileInUse,
    StorageError,
    UnsupportedVersion,
    WrongPin,
)
from capsule.files import FileLock, write_private
from capsule.jids import bare_jid
from capsule.pins import check_pin
from capsule.profile_data import PinnedContact, ProfileData, SessionKey, b64, now_iso
from capsule.profile_key import FAST_KDF, KdfParams, new_key_file, read_key_file
from capsule.replay import Entry, JournalItem, Verdict
from capsule.xmppaddr import cert_jids, xmppaddr_name

MAGIC = b"CAPSULE-PROFILE "
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
__all__ = ["FAST_KDF", "FORMAT_VERSION", "KdfParams", "PinnedContact", "Profile", "ProfileData",
           "now_iso"]


class Profile:
    """An unlocked profile. The derived key stays in memory so saves need no Argon2 run."""

    def __init__(self, path: Path, data: ProfileData, key: bytes, salt: bytes, kdf: KdfParams,
                 key_file: bytes | None = None, key_salt: bytes | None = None):
        self.path = path
        self.data = data
        self._key = key
        self._salt = salt
        self._kdf = kdf
        self._second = key_file
        self._key_salt = key_salt  # None: a format 1 or 2 file
        self._lock = FileLock(path)
        self._holding = False
        self._written: bytes | None = None  # the nonce of the file as we last read or wrote it
        self.journal: journal.Journal | None = None
        self._decryption_keys: tuple[list[Any], dict[str, rsa.RSAPrivateKey]] | None = None

    def __repr__(self) -> str:  # never show keys
        return f"<Profile {self.data.jid} at {self.path}>"

    # -- creation, loading, saving ----------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], jid: str, pin: str, email: str | None = None,
               key_bits: int = alg.DEFAULT_RSA_BITS, kdf: KdfParams | None = None,
               short_pin: bool = False, key_file: str | os.PathLike[str] | None = None,
               signing: str = alg.SIGNING_KEY_TYPES[0],
               share_unlock_with: str | os.PathLike[str] | None = None) -> Profile:
        """Generate signing and encryption key pairs locally and write a new profile.

        ``signing``: 'ed25519' (the default) or 'rsa' (of ``key_bits``). A PIN shorter than
        10 digits / 12 characters needs ``short_pin``. ``key_file``: bind
        the profile key to that file too (created with 32 random bytes if missing).
        ``share_unlock_with``: another profile, which ``pin`` (and the key file) must open,
        whose Argon2id salt and parameters this one takes instead of ``kdf``: a process that
        opens both with the PIN runs Argon2id once.
        """
        target = Path(path)
        if target.exists():
            raise ProfileError(f"{target} exists; refusing to overwrite a profile")
        try:
            jid = bare_jid(jid)
        except ValueError as exc:
            raise ProfileError(str(exc)) from None
        if key_bits not in alg.ACCEPTED_RSA_BITS:
            raise ProfileError(f"RSA key size must be one of {alg.ACCEPTED_RSA_BITS}")
        secret = check_pin(pin, short_pin)
        if share_unlock_with is not None and Path(share_unlock_with).absolute() == target.absolute():
            raise ProfileError(f"{target} cannot share the unlock of itself")
        # the unlock to share is checked before anything is written
        existing = (read_key_file(key_file) if share_unlock_with is not None and key_file
                    and Path(key_file).exists() else None)
        salt, kdf = _new_unlock(pin, kdf, KdfParams(), share_unlock_with, existing)
        second = new_key_file(Path(key_file)) if key_file else None
        key_salt = os.urandom(alg.KDF_SALT_BYTES)
        data = ProfileData(
            jid=jid, email=email,
            signing_key=_new_signing_key(signing, key_bits),
            encryption_key=rsa.generate_private_key(alg.RSA_PUBLIC_EXPONENT, key_bits),
            secret=secret,
        )
        profile = cls(target, data, kdf.derive(pin, salt, second, key_salt), salt, kdf, second,
                      key_salt)
        profile.save()
        return profile

    @classmethod
    def load(cls, path: str | os.PathLike[str], pin: str,
             key_file: str | os.PathLike[str] | None = None) -> Profile:
        """Open a profile (any readable format) and the replay entries journalled since its save."""
        target = Path(path)
        sealed = _Sealed.read(target)
        if sealed.needs_key_file and key_file is None:
            raise ProfileError(f"{target} is bound to a key file: give its path (key_file, "
                               f"--key-file)")
        second = read_key_file(key_file) if sealed.needs_key_file and key_file else None
        key, plain = sealed.open(pin, second)
        try:
            content = json.loads(plain)
            epoch = bytes.fromhex(content.get("journal_epoch", ""))
            marked = content.get("journal_marks") is True  # journals that mark handed capsules
        except (ValueError, AttributeError):
            raise CorruptProfile(f"{target} decrypts to damaged content") from None
        profile = cls(target, ProfileData.from_json(content), key, sealed.salt, sealed.kdf,
                      second, sealed.key_salt)
        profile._written = sealed.nonce
        if epoch:
            profile.data.replay.load(journal.read(journal.journal_path(target),
                                                  journal.journal_key(key), epoch),
                                     unhanded=marked)
        with contextlib.suppress(OSError):  # a read-only disk still opens
            if profile._lock.acquire():  # nobody is writing: clear litter of killed saves
                profile._lock.release()
        return profile

    def save(self) -> None:
        """Encrypt under a fresh nonce and replace the file atomically, under the profile lock;
        with a journal attached, start its next epoch. Raises StorageError if the disk fails."""
        nonce = os.urandom(alg.IV_BYTES)
        epoch = os.urandom(alg.JOURNAL_EPOCH_BYTES)
        header: dict[str, Any] = {
            "version": FORMAT_VERSION if self._key_salt else 2, "cipher": "AES-256-GCM",
            "kdf": {"name": "argon2id", "salt": base64.b64encode(self._salt).decode(),
                    "memory_cost": self._kdf.memory_cost, "iterations": self._kdf.iterations,
                    "lanes": self._kdf.lanes},
            "key_file": self._second is not None,
            "nonce": base64.b64encode(nonce).decode(),
        }
        if self._key_salt:
            header["key_salt"] = base64.b64encode(self._key_salt).decode()
        line = MAGIC + json.dumps(header, sort_keys=True).encode()
        content = {**self.data.to_json(), "journal_epoch": epoch.hex(), "journal_marks": True}
        body = AESGCM(self._key).encrypt(nonce, json.dumps(content).encode(), line)
        took = not self._lock.held
        if took:
            self._take_lock()
        try:
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            write_private(self.path, line + b"\n" + body)
            self._written = nonce
            if self._holding:
                self.journal = journal.Journal(journal.journal_path(self.path),
                                               journal.journal_key(self._key), epoch)
            else:
                journal.journal_path(self.path).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot save {self.path}: {exc.strerror or exc}") from None
        finally:
            if took:
                self._lock.release()

    def hold(self) -> None:
        """Become the profile's only writer (a running bot): take the lock, clear litter, and
        from the next save on journal replay entries (:meth:`append`) between saves.
        Raises ProfileError if another process holds it, StorageError if the save fails."""
        self._take_lock()
        self._holding = True
        self.save()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Keep other processes (a running bot) out while a command changes the profile, and
        fail up front if one is in it; unlike :meth:`hold`, nothing is saved on leaving."""
        self._take_lock()
        try:
            yield
        finally:
            self._lock.release()

    def _take_lock(self) -> None:
        """Raises ProfileInUse while another process holds the file, ProfileChanged if one
        wrote it since we read it (then we must not write), StorageError if locking fails."""
        if self._lock.held:
            return
        try:
            if not self._lock.acquire():
                raise ProfileInUse(f"{self.path} is in use by another process (a running bot?)")
            nonce = self._written and _header_nonce(self.path)
        except OSError as exc:
            self._lock.release()
            raise StorageError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        if nonce != self._written:
            self._lock.release()
            raise ProfileChanged(f"{self.path} was written by another process since this one "
                                 f"opened it: open it again")

    def release(self) -> None:
        """Save (compacting the journal into the profile) and give the lock up."""
        self._holding = False
        try:
            if self._lock.held:
                self.save()
        finally:
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            self._lock.release()

    def append(self, entries: Sequence[JournalItem]) -> None:
        """Write items to the journal and fsync (raises OSError); needs :meth:`hold`."""
        if self.journal is None:
            raise OSError("the replay journal is not open")
        self.journal.append(entries)

    @property
    def protection(self) -> str:
        """What guards the file against a thief, in words (for `capsule profile show`)."""
        secret = {"strong": "a strong PIN/passphrase (10+ digits or 12+ characters)",
                  "short": "a SHORT PIN/passphrase (allowed with --short-pin)",
                  }.get(self.data.secret, "a PIN of unknown strength (format 1; run change-pin)")
        second = " + a key file kept outside the profile" if self._second else " (no key file)"
        return f"{self._kdf.describe()} over {secret}{second}"

    @property
    def unlock(self) -> str:
        """Which profiles share this one's Argon2id run: those with this salt (and PIN)."""
        return f"Argon2id salt {self._salt.hex()}"

    def change_pin(self, new_pin: str, kdf: KdfParams | None = None, short_pin: bool = False,
                   share_unlock_with: str | os.PathLike[str] | None = None) -> None:
        """Re-encrypt under a new PIN (the key file, if any, stays bound) and a new salt, or
        the salt of ``share_unlock_with`` (which the new PIN must open); a format 2 file
        becomes format 3."""
        secret = check_pin(new_pin, short_pin)
        self._salt, self._kdf = _new_unlock(new_pin, kdf, self._kdf, share_unlock_with,
                                            self._second)
        self.data.secret = secret
        self._key_salt = os.urandom(alg.KDF_SALT_BYTES)
        self._key = self._kdf.derive(new_pin, self._salt, self._second, self._key_salt)
        self.save()

    # -- certificates -----------------------------------------------------------
    def csr(self, usage: str) -> bytes:
        """A CSR for our ``sign`` or ``encrypt`` key, asking for our JID as id-on-xmppAddr."""
        key = {"sign": self.data.signing_key, "encrypt": self.data.encryption_key}[usage]
        names: list[x509.GeneralName] = [xmppaddr_name(self.data.jid)]
        if self.data.email:
            names.append(x509.RFC822Name(self.data.email))
        return (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.data.jid)]))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else alg.CSR_HASH)
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
        public = spki(cert.public_key())
        if public == spki(self.data.signing_key.public_key()):
            self.data.signing_cert = text
            return "sign"
        if public == spki(self.data.encryption_key.public_key()):
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
        self.data.encryption_key = rsa.generate_private_key(alg.RSA_PUBLIC_EXPONENT, key_bits)
        self.data.signing_key = _new_signing_key(signatures.kind(self.data.signing_key),
                                                 key_bits)
        self.data.encryption_cert = self.data.signing_cert = None

    def decryption_keys(self) -> dict[str, rsa.RSAPrivateKey]:
        """Our encryption-certificate fingerprints (current and retired) -> private keys."""
        pairs = [(self.data.encryption_cert, self.data.encryption_key), *self.data.retired]
        if self._decryption_keys is None or self._decryption_keys[0] != pairs:
            keys = {cert_fingerprint(x509.load_pem_x509_certificate(pem.encode())): key
                    for pem, key in pairs if pem}
            self._decryption_keys = (pairs, keys)
        return self._decryption_keys[1]

    # -- v1 session keys ----------------------------------------------------------
    def new_session(self, now: int, lifetime: int = alg.SESSION_LIFETIME_S) -> SessionKey:
        """Generate a session key, sign its record with our signing key; kept, not saved."""
        if not self.data.signing_cert:
            raise ProfileError("a session key needs our signing certificate (enroll first)")
        fp = _fingerprint(self.data.signing_cert)
        private = x25519.X25519PrivateKey.generate()
        key = SessionKey(private, sessions.make_record(self.data.jid, fp, self.data.signing_key,
                                                       private, now, lifetime))
        self.data.sessions.append(key)
        return key

    def session_keys(self) -> dict[bytes, x25519.X25519PrivateKey]:
        """sid -> private key of every session key we still hold."""
        return {key.record.sid: key.private for key in self.data.sessions}

    def destroyed_sessions(self) -> set[bytes]:
        return {base64.b64decode(sid) for sid in self.data.destroyed}

    def current_sessions(self, now: int) -> list[sessions.SessionRecord]:
        """Our unexpired records signed under our current signing certificate (contacts
        refuse the others: after a certificate rotation none is current), newest first, at
        most alg.SESSIONS_PUBLISHED."""
        if not self.data.signing_cert:
            return []
        fp = _fingerprint(self.data.signing_cert)
        live = [key for key in self.data.sessions if key.expires > now and key.record.cert == fp]
        live.sort(key=lambda key: (key.created, key.record.pub), reverse=True)
        return [key.record for key in live[:alg.SESSIONS_PUBLISHED]]

    def destroy_sessions(self, now: int, retention: int = alg.SESSION_RETENTION_S) -> int:
        """Forward secrecy: remove every session key whose record expired ``retention``
        seconds ago or more; kept, not saved (until the caller saves, the key is still on
        disk). Returns how many were destroyed."""
        if not 0 <= retention <= alg.SESSION_MAX_RETENTION_S:
            raise ProfileError(f"session retention must be 0..{alg.SESSION_MAX_RETENTION_S} s")
        gone = [key for key in self.data.sessions if key.expires + retention <= now]
        if not gone:
            return 0
        self.data.sessions = [key for key in self.data.sessions if key.expires + retention > now]
        self.data.destroyed.update({b64(key.record.sid): key.expires for key in gone})
        for sid in sorted(self.data.destroyed, key=self.data.destroyed.__getitem__)[
                :max(0, len(self.data.destroyed) - alg.DESTROYED_REMEMBERED)]:
            del self.data.destroyed[sid]
        return len(gone)

    def ready(self) -> bool:
        return bool(self.data.signing_cert and self.data.encryption_cert and self.data.ca_root)

    # -- replay cache -----------------------------------------------------------
    def remember(self, sender: str, nid: bytes, ts: str, signature: bytes,
                 now: int | None = None) -> tuple[Verdict, Entry]:
        """Judge a verified capsule (see capsule.replay) and record it if NEW; raises
        FutureCapsule, StaleCapsule or ReplayedCapsule. Durable only once journalled."""
        entry = Entry.of(sender, nid, ts, signature)
        return self.data.replay.accept(entry, int(time.time()) if now is None else now), entry


@dataclass(frozen=True)
class _Sealed:
    """A profile file as read, before any PIN: its header's fields and the ciphertext."""

    path: Path
    line: bytes  # the header line: the associated data
    ciphertext: bytes
    kdf: KdfParams
    salt: bytes
    key_salt: bytes | None
    nonce: bytes
    needs_key_file: bool

    @classmethod
    def read(cls, target: Path) -> _Sealed:
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
        if version not in READABLE_VERSIONS:
            raise UnsupportedVersion(
                f"{target} is profile format {version}; this Capsule reads {READABLE_VERSIONS}")
        try:
            k = header["kdf"]
            if k["name"] != "argon2id" or header["cipher"] != "AES-256-GCM":
                raise UnsupportedVersion(f"{target} uses {k['name']}/{header['cipher']}")
            kdf = KdfParams(int(k["memory_cost"]), int(k["iterations"]), int(k["lanes"]))
            salt = base64.b64decode(k["salt"], validate=True)
            key_salt = (base64.b64decode(header["key_salt"], validate=True) if version >= 3
                        else None)
            nonce = base64.b64decode(header["nonce"], validate=True)
            needs_key_file = bool(header.get("key_file", False))
        except (KeyError, TypeError, ValueError):
            raise CorruptProfile(f"{target} has a damaged header") from None
        kdf.check()
        if (len(ciphertext) < alg.TAG_BYTES or len(salt) < alg.KDF_SALT_BYTES
                or len(nonce) != alg.IV_BYTES
                or (key_salt is not None and len(key_salt) < alg.KDF_SALT_BYTES)):
            raise CorruptProfile(f"{target} is truncated")
        return cls(target, line, ciphertext, kdf, salt, key_salt, nonce, needs_key_file)

    def open(self, pin: str, key_file: bytes | None) -> tuple[bytes, bytes]:
        """The profile key and the plaintext; WrongPin if they do not decrypt."""
        key = self.kdf.derive(pin, self.salt, key_file, self.key_salt)
        try:
            return key, AESGCM(key).decrypt(self.nonce, self.ciphertext, self.line)
        except InvalidTag:
            raise WrongPin(f"wrong PIN for {self.path} (or the file was altered"
                           + (", or the wrong key file)" if key_file else ")")) from None


def _new_unlock(pin: str, kdf: KdfParams | None, default: KdfParams,
                share_unlock_with: str | os.PathLike[str] | None, key_file: bytes | None
                ) -> tuple[bytes, KdfParams]:
    """The salt and Argon2id parameters of a profile sealed anew under ``pin``: a fresh salt
    with ``kdf`` (else ``default``), or those of the profile ``share_unlock_with``."""
    if share_unlock_with is None:
        return os.urandom(alg.KDF_SALT_BYTES), (kdf or default).check()
    if kdf:
        raise ProfileError("give the KDF parameters or a profile to share the unlock with, "
                           "not both")
    return _unlock_of(share_unlock_with, pin, key_file)


def _unlock_of(named: str | os.PathLike[str], pin: str, key_file: bytes | None
               ) -> tuple[bytes, KdfParams]:
    """The Argon2id salt and parameters of ``other``, once ``pin`` (and the key file) open it:
    profiles share an unlock only under one PIN, else each would still run its own. A format 1
    or 2 ``other`` is refused: its key is Argon2id's output itself, which would give away the
    keys of every profile sharing its salt."""
    if not os.fspath(named):  # e.g. an unset variable in a fleet's script
        raise ProfileError("no profile named to share the unlock of (an empty path)")
    other = Path(named)
    sealed = _Sealed.read(other)
    if sealed.key_salt is None:
        raise ProfileError(f"{other} is an older profile format, whose key is the shared "
                           f"Argon2id output itself: change its PIN first (capsule profile "
                           f"change-pin), which makes it format 3")
    if sealed.needs_key_file and key_file is None:
        raise ProfileError(f"{other} is bound to a key file: only a profile bound to the same "
                           f"key file shares its unlock")
    try:
        sealed.open(pin, key_file if sealed.needs_key_file else None)
    except WrongPin:
        raise WrongPin(f"the PIN (or key file) given does not open {other}: a profile shares "
                       f"an unlock only with profiles of the same PIN") from None
    return sealed.salt, sealed.kdf


def _header_nonce(path: Path) -> bytes | None:
    """The nonce in a profile file's header (unique per save), None if gone or unreadable."""
    try:
        with path.open("rb") as file:
            line = file.readline()
    except FileNotFoundError:
        return None
    try:
        return base64.b64decode(json.loads(line[len(MAGIC):])["nonce"], validate=True)
    except (ValueError, KeyError, TypeError):
        return None


@functools.lru_cache(maxsize=8)  # read on every seal (current_sessions): parsed once
def _fingerprint(pem: str) -> str:
    return cert_fingerprint(x509.load_pem_x509_certificate(pem.encode()))


def _new_signing_key(kind: str, key_bits: int) -> signatures.SigningKey:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa":
        return rsa.generate_private_key(alg.RSA_PUBLIC_EXPONENT, key_bits)
    raise ProfileError(f"a signing key is one of {alg.SIGNING_KEY_TYPES}, not {kind!r}")


def spki(key: object) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key: compares keys of any type."""
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined, no-any-return]
                            serialization.PublicFormat.SubjectPublicKeyInfo)
