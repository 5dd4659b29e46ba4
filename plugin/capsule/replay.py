"""Replay state: which capsules were accepted, per sender, and the time rules. Pure: no I/O.

A capsule is judged against the receiver's clock ``now`` (seconds since the epoch):

- dated later than ``now + skew``: refused (``clock-skew``), so no date can reach far ahead;
- dated before ``now - max_age``: refused (``too-old``); history (MAM) is not judged here;
- (sender, nid) already accepted with the same signature: DUPLICATE, the very capsule again
  (a resend after a reconnect, or a copy): dropped quietly; with another signature: ``replay``;
- at or before the sender's horizon: ``replay`` (its entry may have been evicted).

Entries are kept per sender until they leave the age window; a sender with more than
``per_sender`` entries loses its oldest ones, which raises *that sender's* horizon only. An
entry dated after ``now`` is evicted only past twice the bound, so a horizon stays at or behind
the receiver's clock but under a flood of future-dated capsules from that one sender.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
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
class TimeRules:
    skew: int = DEFAULT_SKEW
    max_age: int = DEFAULT_MAX_AGE


@dataclass
class _Sender:
    entries: dict[str, Entry] = field(default_factory=dict)  # nid -> entry
    heap: list[tuple[int, str]] = field(default_factory=list)  # (ts, nid), lazily cleaned
    horizon: int = 0


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
        if seen is not None:
            if seen.sig in (entry.sig, ""):
                return Verdict.DUPLICATE
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
        state.entries[entry.nid] = entry
        heapq.heappush(state.heap, (entry.ts, entry.nid))
        self._evict(state, now)

    def accept(self, entry: Entry, now: int) -> Verdict:
        verdict = self.check(entry, now)
        if verdict is Verdict.NEW:
            self.add(entry, now)
        return verdict

    def forget(self, entry: Entry) -> None:
        """Undo :meth:`add` (its journal write failed); the heap is cleaned lazily."""
        state = self._senders.get(entry.sender)
        if state and state.entries.get(entry.nid) == entry:
            del state.entries[entry.nid]

    def _evict(self, state: _Sender, now: int) -> None:
        cutoff = now - self.rules.max_age
        while state.heap:
            ts, nid = state.heap[0]
            entry = state.entries.get(nid)
            if entry is None or entry.ts != ts:  # forgotten
                heapq.heappop(state.heap)
                continue
            over = len(state.entries) - self.per_sender
            if not (ts < cutoff or (over > 0 and ts <= now) or over > self.per_sender):
                return
            heapq.heappop(state.heap)
            del state.entries[nid]
            state.horizon = max(state.horizon, ts)

    def entries(self) -> list[Entry]:
        return [e for s in self._senders.values() for e in s.entries.values()]

    def to_json(self, now: int) -> dict[str, Any]:
        for state in self._senders.values():
            self._evict(state, now)
        return {"entries": [e.to_json() for e in self.entries()], "floor": self.floor,
                "horizons": {j: s.horizon for j, s in self._senders.items() if s.horizon}}

    @classmethod
    def from_json(cls, raw: dict[str, Any], rules: TimeRules | None = None) -> ReplayState:
        state = cls(rules, floor=int(raw.get("floor", 0)))
        for sender, horizon in raw.get("horizons", {}).items():
            state._senders.setdefault(sender, _Sender()).horizon = int(horizon)
        state.load([Entry.from_json(e) for e in raw.get("entries", [])])
        return state

    def load(self, entries: list[Entry]) -> None:
        """Add entries read back from disk, without judging them again (nor evicting)."""
        for entry in entries:
            s = self._senders.setdefault(entry.sender, _Sender())
            if entry.nid not in s.entries:
                s.entries[entry.nid] = entry
                heapq.heappush(s.heap, (entry.ts, entry.nid))
