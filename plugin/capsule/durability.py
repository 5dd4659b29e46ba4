"""Durable state: replay entries journalled before delivery, other changes saved in batches.

A capsule is delivered only once its replay entry is on disk (group-committed by
:class:`~capsule.journal.GroupCommit`), and marked handed once the app got it (the second
phase, see capsule.replay: a capsule on disk without its mark is delivered again). Pins and
CRLs are saved ``save_delay`` after the first change. While the disk refuses, capsules are
refused (StorageError) and the save is retried every ``storage_retry`` seconds; the profile
lock is held while the session lasts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from slixmpp import BaseXMPP, Message

from capsule import events, wire
from capsule.errors import CapsuleError, DuplicateCapsule, ProfileError, StorageError
from capsule.journal import GroupCommit
from capsule.profile import Profile
from capsule.replay import Entry, Handed, JournalItem, Verdict

log = logging.getLogger(__name__)
COMPACT_AFTER = 512  # journal records (batches) before the profile is saved

Spawn = Callable[[Coroutine[Any, Any, None]], asyncio.Future[None]]


class DurableState:
    """The profile's writer while the plugin runs: journal, batched saves, the lock."""

    def __init__(self, xmpp: BaseXMPP, store: Profile, save_delay: float, retry: float,
                 spawn: Spawn) -> None:
        self.xmpp, self.store = xmpp, store
        self.save_delay, self.retry_delay, self._spawn = save_delay, retry, spawn
        self._save_handle: asyncio.TimerHandle | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._commit = GroupCommit(store.append, self._journal_failed)
        self.error: StorageError | None = None
        try:  # take the profile lock, clear litter, start the journal
            self.store.hold()
        except StorageError as exc:  # the disk: capsules are refused until a retry works
            self._failed(exc)
        # ProfileInUse and ProfileChanged leave the plugin unregistered: another process has
        # the profile, and a second writer would roll its state back

    def remember(self, capsule: wire.AnyCapsule) -> tuple[asyncio.Future[None], bool]:
        """Judge a verified capsule; a NEW one's entry goes to the journal (the future). True
        for one recovered from before a crash (on disk already, maybe seen by the app)."""
        self._ensure_durable()
        h = capsule.header
        verdict, entry = self.store.remember(h.sender, h.nid, h.ts, capsule.signature,
                                             int(time.time()))
        if verdict is Verdict.DUPLICATE:
            raise DuplicateCapsule(f"capsule {h.nid.hex()[:8]}… from {h.sender} was already "
                                   f"accepted", handed=self.store.data.replay.handed(
                                       h.sender, h.nid.hex()))
        if verdict is Verdict.UNHANDED:
            log.info("capsule %s… from %s was accepted before a crash and never handed to the "
                     "app: delivered now", h.nid.hex()[:8], h.sender)
            return done(), True  # its entry is on disk already
        journal = self.store.journal
        if journal is not None and journal.records >= COMPACT_AFTER:
            self.dirty()  # fold the journal into the profile soon
        return self._commit.submit(entry), False

    async def handed(self, msg: Message) -> bool:
        """The second phase: record that the app got this capsule; False if that failed (a
        ``storage`` error then; a resend, now or after a restart, is delivered again)."""
        info = events.capsule_info(msg)
        if info is None:
            return False
        mark = Handed(info.sender, info.nid)
        try:
            self._ensure_durable()  # the journal is closed while disconnected
            await self._commit.submit(mark)
        except StorageError:
            self.orphan(msg)
            return False
        self.store.data.replay.hand(mark)
        return True

    def orphan(self, msg: Message) -> None:
        """Not handed after all (its mark failed, the app gave up on it): a copy is delivered
        again, now or after a restart, instead of being dropped as a duplicate."""
        info = events.capsule_info(msg)
        if info is not None:
            self.store.data.replay.orphan(Handed(info.sender, info.nid))

    async def idle(self) -> None:
        """Until no journal write runs (then :meth:`persist` may be called)."""
        await self._commit.idle()

    def dirty(self) -> None:
        """Something to save changed: save within ``save_delay``."""
        if self._save_handle is None:
            self._save_handle = self.xmpp.loop.call_later(self.save_delay, self._spawn_save)

    def persist(self) -> None:
        """Save now under the profile lock (compacting the journal); the outcome decides
        whether capsules are delivered. Call only while no journal write runs."""
        self._cancel_save()
        try:
            self.store.hold()
        except (StorageError, ProfileError) as exc:
            self._failed(exc)
            return
        if self.error is not None:
            log.warning("capsule state is durable again: capsules are delivered again")
            self.xmpp.event("capsule_storage_recovered", str(self.store.path))
        self.error = None

    def disconnected(self) -> None:
        if self._commit.busy:
            self._spawn(self._release_when_idle())
        else:
            self.release()  # at once: a restarted bot may open the profile next

    def release(self) -> None:
        """Save and give the profile lock up (taken again with the next capsule)."""
        self._cancel_save()
        try:
            self.store.release()
        except (StorageError, ProfileError) as exc:
            events.fail(self.xmpp, exc if isinstance(exc, StorageError)
                        else StorageError(str(exc)), None, "")

    def _ensure_durable(self) -> None:
        """Refuse (StorageError) while replay entries cannot be written; retry first."""
        if self.error is None and self.store.journal is not None:
            return
        if not self._commit.busy:
            self.persist()
        if self.error is not None:
            raise StorageError(f"capsules are refused until the replay state can be made "
                               f"durable again ({self.error})")

    def _journal_failed(self, items: list[JournalItem], exc: Exception) -> None:
        for entry in items:
            if isinstance(entry, Entry):  # not delivered: a resend must be accepted
                self.store.data.replay.forget(entry)
        self._failed(StorageError(f"cannot write the replay journal: "
                                  f"{getattr(exc, 'strerror', None) or exc}"))

    def _failed(self, exc: CapsuleError) -> None:
        first = self.error is None
        self.error = exc if isinstance(exc, StorageError) else StorageError(str(exc))
        if first:
            events.fail(self.xmpp, self.error, None, "")
        if self._retry_handle is None:
            self._retry_handle = self.xmpp.loop.call_later(self.retry_delay, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        if self._commit.busy:
            self._retry_handle = self.xmpp.loop.call_later(self.retry_delay, self._retry)
            return
        self.persist()

    def _cancel_save(self) -> None:
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None

    def _spawn_save(self) -> None:
        self._save_handle = None
        self._spawn(self._save())

    async def _save(self) -> None:
        await self._commit.idle()
        self.persist()

    async def _release_when_idle(self) -> None:
        await self._commit.idle()
        self.release()


def done() -> asyncio.Future[None]:
    """A future that is done already (nothing to wait for)."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future
