"""Replay state: which capsules were accepted, per sender, and the time rules. Pure: no I/O.

A capsule is judged against the receiver's clock ``now`` (seconds since the epoch):

- dated later than ``now + skew``: refused (``clock-skew``), so no date can reach far ahead;
- dated before ``now - max_age``: refused (``too-old``); history (MAM) is not judged here;
- (sender, nid) already accepted with the same signature: DUPLICATE, the very capsule again
  (a resend after a reconnect, or a copy): dropped quietly; with another signature: ``replay``;
  but UNHANDED if it was accepted by a process that died before handing it to the app;
- at or before the sender's horizon: ``replay`` (its entry may have been evicted).

Entries are kept per sender until they leave the age window; a sender with more than
``per_sender`` entries loses its oldest ones, which raises *that sender's* horizon only. An
entry dated after ``now`` is evicted only past twice the bound, so a horizon stays at or behind
the receiver's clock but under a flood of future-dated capsules from that one sender.

Two phases: an entry is *accepted* (durable before the app gets the capsule) and then *handed*
(the app got it: a :class:`Handed` mark). Entries read back from disk without their mark are
orphans of a crash in between; the capsule again is then delivered once (UNHANDED), not dropped.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from capsule.core import parse_timestamp
from capsule.errors import FutureCapsule, ReplayedCapsule, StaleCapsule

DEFAULT_SKEW = 300  # seconds a sender's clock may run ahead of ours
DEFAULT_MAX_AGE = 30 * 86400  # our stacks keep offline messages without expiry; 30 days live
PER_SENDER_MAX = 10000


class Verdict(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    UNHANDED = "unhanded"  # accepted before a crash, never handed to the app: deliver it now


@dataclass(frozen=True)
class Entry:
    """One accepted capsule: who, which nid (hex), its date, a digest of its signature."""

    sender: str
    nid: str
    ts: int
    sig: str  # first 16 bytes of SHA-256(signature), hex; "" for entries of format-1 profiles

    @classmethod
    def of(cls, sender: str, nid: bytes, ts: str, signature: bytes) -> Entry:
        return cls(sender, nid.hex(), parse_timestamp(ts),
                   hashlib.sha256(signature).digest()[:16].hex())

    def to_json(self) -> list[Any]:
        return [self.sender, self.nid, self.ts, self.sig]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Entry:
        sender, nid, ts, sig = raw
        if not (isinstance(sender, str) and isinstance(nid, str) and isinstance(ts, int)
                and isinstance(sig, str)):
            raise ValueError("bad replay entry")
        return cls(sender, nid, ts, sig)


@dataclass(frozen=True)
class Handed:
    """The second phase of an entry: the capsule (sender, nid hex) reached the app."""

    sender: str
    nid: str

    def to_json(self) -> list[Any]:
        return [self.sender, self.nid]


JournalItem = Entry | Handed


def item_from_json(raw: list[Any]) -> JournalItem:
    """An accepted entry (four fields) or a handed mark (two)."""
    if isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, str) for x in raw):
        return Handed(raw[0], raw[1])
    return Entry.from_json(raw)


@dataclass(frozen=True)
class TimeRules:
    skew: int = DEFAULT_SKEW
    max_age: int = DEFAULT_MAX_AGE


# What an entry keeps of itself: (ts, sig). A plain tuple of atoms, which the collector stops
# tracking: a bot holds up to PER_SENDER_MAX of these per sender for 30 days, and an Entry
# object each would be walked by every full collection of the process (the cost of a
# collection grows with the tracked objects alive; see README, "Scaling out").
_Kept = tuple[int, str]


@dataclass
class _Sender:
    entries: dict[str, _Kept] = field(default_factory=dict)  # nid -> (ts, sig)
    heap: list[tuple[int, str]] = field(default_factory=list)  # (ts, nid), lazily cleaned
    horizon: int = 0
    unhanded: set[str] = field(default_factory=set)  # accepted, not yet handed to the app
    orphans: set[str] = field(default_factory=set)  # of those, read from disk: a crash between


class ReplayState:
    """The accepted capsules of every sender, judged by :class:`TimeRules`."""

    def __init__(self, rules: TimeRules | None = None, per_sender: int = PER_SENDER_MAX,
                 floor: int = 0):
        self.rules = rules or TimeRules()
        self.per_sender = per_sender
        self.floor = floor  # a horizon for all senders, only from a format-1 profile
        self._senders: dict[str, _Sender] = {}

    def __len__(self) -> int:
        return sum(len(s.entries) for s in self._senders.values())

    def horizon(self, sender: str) -> int:
        state = self._senders.get(sender)
        return max(self.floor, state.horizon if state else 0)

    def check(self, entry: Entry, now: int) -> Verdict:
        """NEW or DUPLICATE; raises FutureCapsule, StaleCapsule or ReplayedCapsule."""
        who = f"capsule {entry.nid[:8]}… from {entry.sender}"
        if entry.ts > now + self.rules.skew:
            raise FutureCapsule(f"{who} is dated {entry.ts - now} s ahead of our clock "
                                f"(allowed: {self.rules.skew} s)")
        known = self._senders.get(entry.sender)
        seen = known.entries.get(entry.nid) if known else None
        if known is not None and seen is not None:
            if seen[1] in (entry.sig, ""):
                return Verdict.UNHANDED if entry.nid in known.orphans else Verdict.DUPLICATE
            raise ReplayedCapsule(f"{who} reuses the nid of another capsule")
        if entry.ts < now - self.rules.max_age:
            raise StaleCapsule(f"{who} is {(now - entry.ts) // 86400} days old (live delivery "
                               f"takes up to {self.rules.max_age // 86400} days)")
        if entry.ts <= self.horizon(entry.sender):
            raise ReplayedCapsule(f"{who} is older than the replay window")
        return Verdict.NEW

    def add(self, entry: Entry, now: int) -> None:
        """Record an entry judged NEW; evicts what left the window or exceeds the bound."""
        state = self._senders.setdefault(entry.sender, _Sender())
        state.entries[entry.nid] = (entry.ts, entry.sig)
        state.unhanded.add(entry.nid)
        heapq.heappush(state.heap, (entry.ts, entry.nid))
        self._evict(state, now)

    def accept(self, entry: Entry, now: int) -> Verdict:
        """Judge and record: NEW is added, UNHANDED is in this process's hands from now on."""
        verdict = self.check(entry, now)
        if verdict is Verdict.NEW:
            self.add(entry, now)
        elif verdict is Verdict.UNHANDED:
            self._senders[entry.sender].orphans.discard(entry.nid)
        return verdict

    def hand(self, mark: Handed) -> None:
        """The second phase: the capsule reached the app (its mark is durable)."""
        state = self._senders.get(mark.sender)
        if state:
            state.unhanded.discard(mark.nid)
            state.orphans.discard(mark.nid)

    def orphan(self, mark: Handed) -> None:
        """Its handed mark could not be written: like a crash before it, a copy of this
        capsule is delivered again (UNHANDED) rather than dropped as a duplicate."""
        state = self._senders.get(mark.sender)
        if state and mark.nid in state.unhanded:
            state.orphans.add(mark.nid)

    def handed(self, sender: str, nid: str) -> bool:
        """Whether this accepted capsule is known to have reached the app."""
        state = self._senders.get(sender)
        return state is not None and nid in state.entries and nid not in state.unhanded

    def forget(self, entry: Entry) -> None:
        """Undo :meth:`add` (its journal write failed); the heap is cleaned lazily."""
        state = self._senders.get(entry.sender)
        if state and state.entries.get(entry.nid) == (entry.ts, entry.sig):
            del state.entries[entry.nid]
            state.unhanded.discard(entry.nid)
            state.orphans.discard(entry.nid)

    def _evict(self, state: _Sender, now: int) -> None:
        cutoff = now - self.rules.max_age
        while state.heap:
            ts, nid = state.heap[0]
            kept = state.entries.get(nid)
            if kept is None or kept[0] != ts:  # forgotten
                heapq.heappop(state.heap)
                continue
            over = len(state.entries) - self.per_sender
            if not (ts < cutoff or (over > 0 and ts <= now) or over > self.per_sender):
                return
            heapq.heappop(state.heap)
            del state.entries[nid]
            state.unhanded.discard(nid)
            state.orphans.discard(nid)
            state.horizon = max(state.horizon, ts)

    def entries(self) -> list[Entry]:
        return [Entry(sender, nid, ts, sig) for sender, s in self._senders.items()
                for nid, (ts, sig) in s.entries.items()]

    def to_json(self, now: int) -> dict[str, Any]:
        for state in self._senders.values():
            self._evict(state, now)
        return {"entries": [e.to_json() for e in self.entries()], "floor": self.floor,
                "horizons": {j: s.horizon for j, s in self._senders.items() if s.horizon},
                "unhanded": [[j, nid] for j, s in self._senders.items() for nid in s.unhanded]}

    @classmethod
    def from_json(cls, raw: dict[str, Any], rules: TimeRules | None = None) -> ReplayState:
        state = cls(rules, floor=int(raw.get("floor", 0)))
        for sender, horizon in raw.get("horizons", {}).items():
            state._senders.setdefault(sender, _Sender()).horizon = int(horizon)
        state.load([Entry.from_json(e) for e in raw.get("entries", [])])
        for sender, nid in raw.get("unhanded", []):
            state._orphan(str(sender), str(nid))
        return state

    def load(self, items: Sequence[JournalItem], unhanded: bool = False) -> None:
        """Add entries read back from disk, without judging them again (nor evicting). With
        ``unhanded`` an entry is an orphan until a :class:`Handed` mark for it follows."""
        for item in items:
            if isinstance(item, Handed):
                self.hand(item)
                continue
            s = self._senders.setdefault(item.sender, _Sender())
            if item.nid not in s.entries:
                s.entries[item.nid] = (item.ts, item.sig)
                heapq.heappush(s.heap, (item.ts, item.nid))
                if unhanded:
                    self._orphan(item.sender, item.nid)

    def _orphan(self, sender: str, nid: str) -> None:
        state = self._senders.get(sender)
        if state and nid in state.entries:
            state.unhanded.add(nid)
            state.orphans.add(nid)
