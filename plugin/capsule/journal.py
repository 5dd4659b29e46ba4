"""The replay journal: accepted capsules appended next to the profile, on disk before delivery.

File ``<profile>.journal``::

    CAPSULE-JOURNAL <epoch hex>\\n  then records: <length: 4 bytes> <nonce: 12> <AES-256-GCM>

Each record holds a batch of journal items (JSON) under a key derived from the profile key
(so a thief without the PIN learns nothing): accepted replay entries, and the marks of capsules
handed to the app since (two phases, see capsule.replay). The associated data binds the epoch and the
record's sequence number, so no record can be forged, altered, reordered or moved to another
journal. The profile stores its epoch; every profile save takes a new epoch (compaction) and
starts the journal afresh, so a journal left from before a save is ignored.

Truncation: a torn last record (a crash during its write) is dropped; nothing waiting for it
was delivered. A cut at a record boundary cannot be told from a crash before the write: it
forgets the latest entries, like restoring an older copy of the profile.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from capsule import algorithms as alg
from capsule.errors import CorruptProfile, StorageError
from capsule.files import write_private
from capsule.replay import JournalItem, item_from_json

MAGIC = b"CAPSULE-JOURNAL "
BATCH_MAX = 256  # entries per record: small batches, one fsync each


def journal_path(profile: Path) -> Path:
    return profile.with_name(profile.name + ".journal")


def journal_key(profile_key: bytes) -> bytes:
    return HKDF(alg.KEY_HASH, 32, salt=None, info=alg.JOURNAL_KEY_INFO).derive(profile_key)


def _aad(epoch: bytes, seq: int) -> bytes:
    return MAGIC + epoch + struct.pack(">Q", seq)


def read(path: Path, key: bytes, epoch: bytes) -> list[JournalItem]:
    """The items of the journal of ``epoch``, in order (none if absent or of another epoch)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    line, sep, body = raw.partition(b"\n")
    if not sep or line != MAGIC + epoch.hex().encode():
        return []  # from before the last save: already compacted into the profile
    aead, items, offset, seq = AESGCM(key), [], 0, 0
    while offset + 4 <= len(body):
        (length,) = struct.unpack_from(">I", body, offset)
        end = offset + 4 + length
        if end > len(body):
            break  # torn last record
        record = body[offset + 4:end]
        try:
            plain = aead.decrypt(record[:alg.IV_BYTES], record[alg.IV_BYTES:], _aad(epoch, seq))
            items += [item_from_json(e) for e in json.loads(plain)]
        except (InvalidTag, ValueError, TypeError):
            if end == len(body):
                break  # a torn last record whose length field made it to disk
            raise CorruptProfile(f"{path}: record {seq} was altered") from None
        offset, seq = end, seq + 1
    return items


class Journal:
    """Appends records for one epoch; open after the profile of that epoch is on disk."""

    def __init__(self, path: Path, key: bytes, epoch: bytes):
        self.path = path
        self._aead = AESGCM(key)
        self._epoch = epoch
        self._seq = 0
        write_private(path, MAGIC + epoch.hex().encode() + b"\n")
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND)

    def append(self, entries: Sequence[JournalItem]) -> None:
        """One record, written and fsynced; raises OSError (the journal is then unusable)."""
        if self._fd is None:
            raise OSError("journal is closed")
        nonce = os.urandom(alg.IV_BYTES)
        plain = json.dumps([e.to_json() for e in entries]).encode()
        record = nonce + self._aead.encrypt(nonce, plain, _aad(self._epoch, self._seq))
        try:
            os.write(self._fd, struct.pack(">I", len(record)) + record)
            os.fsync(self._fd)
        except OSError:
            self.close()  # a partial record may be on disk: never append after it
            raise
        self._seq += 1

    @property
    def records(self) -> int:
        return self._seq

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class GroupCommit:
    """Makes items durable in small batches: one write+fsync (in a thread) per batch, while
    the next batch gathers. ``submit`` returns a future done when the item is on disk, or
    failed with StorageError; a failed batch is handed to ``failed`` (to be forgotten)."""

    def __init__(self, write: Callable[[list[JournalItem]], None],
                 failed: Callable[[list[JournalItem], Exception], None]):
        self._write = write
        self._failed = failed
        self._pending: list[tuple[JournalItem, asyncio.Future[None]]] = []
        self._worker: asyncio.Task[None] | None = None

    def submit(self, entry: JournalItem) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((entry, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        return future

    @property
    def busy(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def idle(self) -> None:
        """Wait until every submitted entry is written (or failed)."""
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
            entries = [entry for entry, _ in batch]
            try:
                await loop.run_in_executor(None, self._write, entries)
            except Exception as exc:  # whatever it was, nothing is durable
                self._failed(entries, exc)
                error = StorageError(f"the replay journal could not be written: "
                                     f"{getattr(exc, 'strerror', None) or exc}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
