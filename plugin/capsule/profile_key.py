"""The profile key: Argon2id over the PIN (parameters bounded before use), optionally mixed
with a key file of 32 random bytes kept outside the profile (HKDF), then (format 3) made the
profile's own with HKDF over a salt of its own.

The Argon2id output depends only on the PIN, the salt and the parameters, so profiles made to
share a salt (``--share-unlock-with``) and opened with one PIN in one process stretch the PIN
once: the process keeps the outputs it derived, looked up by salt, parameters and a keyed hash
of the PIN (a wrong PIN never finds a right PIN's output; the hash key is renewed, and what
was kept dropped, in a forked child). At rest nothing changes: each file still costs a thief
one Argon2id run per guess, and its key is its own."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from capsule import algorithms as alg
from capsule.errors import CorruptProfile, ProfileError, StorageError
from capsule.files import write_private

# cryptography 50 (OpenSSL 4.0) deadlocks when two Argon2id derivations with more than one lane
# run at once in one process (threads unlocking profiles): one at a time
_DERIVING = threading.Lock()
_STRETCHED: dict[tuple[bytes, KdfParams, bytes], bytes] = {}  # (salt, params, PIN tag) -> output
_STRETCHED_MAX = 64  # distinct PIN/salt pairs a process keeps (oldest dropped first)
_PIN_TAG_KEY = os.urandom(32)  # this process's: a tag says nothing about a PIN elsewhere


def _forget_in_child() -> None:
    global _PIN_TAG_KEY
    _STRETCHED.clear()
    _PIN_TAG_KEY = os.urandom(32)


os.register_at_fork(after_in_child=_forget_in_child)


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters, stored in the file header (RFC 9106's second recommendation)."""

    memory_cost: int = 65536  # KiB
    iterations: int = 3
    lanes: int = 4

    def check(self) -> KdfParams:
        """Refuse parameters outside alg.ARGON2_* (a crafted header must not pick our cost)."""
        for value, (low, high), name in ((self.memory_cost, alg.ARGON2_MEMORY_KIB, "memory"),
                                         (self.iterations, alg.ARGON2_ITERATIONS, "iterations"),
                                         (self.lanes, alg.ARGON2_LANES, "lanes")):
            if not low <= value <= high:
                raise CorruptProfile(f"Argon2id {name} {value} is outside {low}..{high}")
        return self

    def derive(self, pin: str, salt: bytes, key_file: bytes | None = None,
               key_salt: bytes | None = None) -> bytes:
        """The profile key; ``key_salt`` (format 3) makes it this profile's own."""
        key = self._stretch(pin, salt)
        if key_file is not None:
            key = HKDF(alg.KEY_HASH, alg.PROFILE_KEY_BYTES, salt=None,
                       info=alg.PROFILE_KEY_FILE_INFO).derive(key + key_file)
        if key_salt is None:  # formats 1 and 2
            return key
        return HKDF(alg.KEY_HASH, alg.PROFILE_KEY_BYTES, salt=key_salt,
                    info=alg.PROFILE_KEY_INFO).derive(key)

    def _stretch(self, pin: str, salt: bytes) -> bytes:
        self.check()
        secret = _encoded(pin)
        found = (salt, self, hmac.digest(_PIN_TAG_KEY, secret, hashlib.sha256))
        with _DERIVING:
            if found in _STRETCHED:
                return _STRETCHED[found]
            key = self._argon2id(secret, salt)
            if len(_STRETCHED) >= _STRETCHED_MAX:
                del _STRETCHED[next(iter(_STRETCHED))]
            _STRETCHED[found] = key
        return key

    def guess(self, pin: str) -> None:
        """One Argon2id run over ``pin``, kept nowhere: what each guess costs a thief."""
        self.check()
        with _DERIVING:
            self._argon2id(_encoded(pin), os.urandom(alg.KDF_SALT_BYTES))

    def _argon2id(self, secret: bytes, salt: bytes) -> bytes:
        return Argon2id(salt=salt, length=alg.PROFILE_KEY_BYTES, iterations=self.iterations,
                        lanes=self.lanes, memory_cost=self.memory_cost).derive(secret)

    def describe(self) -> str:
        return (f"Argon2id {self.memory_cost // 1024} MiB, {self.iterations} iteration(s), "
                f"{self.lanes} lane(s)")


def _encoded(pin: str) -> bytes:
    try:
        return pin.encode()
    except UnicodeEncodeError:  # lone surrogates, e.g. undecodable bytes of the environment
        raise ProfileError("the PIN is not valid text (UTF-8)") from None


FAST_KDF = KdfParams(memory_cost=8192, iterations=1, lanes=1)  # for tests and bulk bots


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    try:
        secret = Path(path).read_bytes()
    except OSError as exc:
        raise ProfileError(f"cannot read the key file {path}: {exc.strerror}") from None
    if len(secret) != alg.KEY_FILE_BYTES:
        raise ProfileError(f"{path} is not a Capsule key file ({alg.KEY_FILE_BYTES} bytes)")
    return secret


def new_key_file(path: Path) -> bytes:
    """The key file at ``path``, created with fresh random bytes if missing."""
    if path.exists():
        return read_key_file(path)
    secret = os.urandom(alg.KEY_FILE_BYTES)
    try:
        write_private(path, secret)
    except OSError as exc:
        raise StorageError(f"cannot write the key file {path}: {exc.strerror}") from None
    return secret
