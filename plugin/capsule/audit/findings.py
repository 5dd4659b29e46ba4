"""What an audit finds, kept as rows stream through: one finding per stored row, tallies and a
bounded timeline per conversation, the problems themselves (capped)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

VERDICTS = ("plaintext", "capsule", "bad-signature", "sender-mismatch", "recipient-mismatch",
            "unverified", "malformed", "other")
FAILING = ("plaintext", "bad-signature", "sender-mismatch", "recipient-mismatch", "unverified",
           "malformed")
_BIT = {verdict: 1 << i for i, verdict in enumerate(VERDICTS)}
BARS = 48  # a conversation's timeline holds at most this many time buckets


class StoredRow(NamedTuple):
    """One row a server stored: where, whose, when, and the stanza as text (a tuple: one is
    made per stored row, so it must be cheap)."""

    store: str  # e.g. "ejabberd archive", "openfire ofOffline"
    row_id: str
    owner: str  # the account whose archive or queue holds it ("" if none)
    when: dt.datetime | None
    stanza: str
    column: str = ""  # a body the server stored beside the stanza (ejabberd txt, Openfire body)


@dataclass(frozen=True, slots=True)
class CertFacts:
    """The signing certificate a capsule names, as an auditor needs to cite it."""

    fingerprint: str  # as the capsule names it
    serial: str = ""  # hex; "" when the certificate is not known
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    signed_at: dt.datetime | None = None  # the capsule's timestamp

    @property
    def valid_at_signing(self) -> bool | None:
        """Whether the capsule's timestamp lies in the validity window (None: unknown)."""
        if self.not_before is None or self.not_after is None or self.signed_at is None:
            return None
        return self.not_before <= self.signed_at <= self.not_after


class Finding(NamedTuple):
    row: StoredRow
    verdict: str
    sender: str
    recipient: str
    key: str  # identifies the message across the rows that store it
    detail: str = ""
    signer: str = ""  # who the capsule says signed it
    cert: CertFacts | None = None


class Timeline:
    """Messages per verdict over time in at most :data:`BARS` buckets. Buckets are aligned to
    the epoch and start a minute wide; the width doubles (merging neighbours) whenever the span
    outgrows them, so memory stays bounded however long the archive."""

    def __init__(self) -> None:
        self.width = 60
        self.buckets: dict[int, dict[str, int]] = {}
        self.lo = self.hi = 0

    def add(self, when: dt.datetime, verdict: str) -> None:
        seconds = int(when.timestamp())
        index = seconds // self.width
        if not self.buckets:
            self.lo = self.hi = index
        elif not self.lo <= index <= self.hi:
            self.lo, self.hi = min(self.lo, index), max(self.hi, index)
            while self.hi - self.lo >= BARS:
                self._coarsen()
            index = seconds // self.width
        bucket = self.buckets.get(index)
        if bucket is None:
            bucket = self.buckets[index] = dict.fromkeys(VERDICTS, 0)
        bucket[verdict] += 1

    def _coarsen(self) -> None:
        merged: dict[int, dict[str, int]] = {}
        for index, counts in self.buckets.items():
            into = merged.setdefault(index // 2, dict.fromkeys(VERDICTS, 0))
            for verdict, n in counts.items():
                into[verdict] += n
        self.buckets, self.width = merged, self.width * 2
        self.lo, self.hi = self.lo // 2, self.hi // 2

    def bars(self) -> list[tuple[dt.datetime, dict[str, int]]]:
        """(bucket start, counts) for every bucket from the first to the last, empty ones too."""
        empty = dict.fromkeys(VERDICTS, 0)
        return [(dt.datetime.fromtimestamp(i * self.width, dt.UTC), self.buckets.get(i, empty))
                for i in range(self.lo, self.hi + 1)] if self.buckets else []


@dataclass
class Conversation:
    peers: tuple[str, str]
    rows: int = 0
    # hash of each message's key -> the verdicts its rows got, as bits (~100 bytes a message)
    keys: dict[int, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    first: dt.datetime | None = None
    last: dt.datetime | None = None
    timeline: Timeline = field(default_factory=Timeline)

    @property
    def messages(self) -> int:
        return len(self.keys)

    @property
    def verdict(self) -> str:
        c = self.counts
        if c["bad-signature"] or c["sender-mismatch"] or c["recipient-mismatch"]:
            return "TAMPERED"
        if c["plaintext"]:
            return "PLAINTEXT"
        if c["unverified"] or c["malformed"]:
            return "UNVERIFIED"
        return "ENCRYPTED" if c["capsule"] else "OTHER"


_NEVER = dt.datetime.min.replace(tzinfo=dt.UTC)  # sorts a missing time first


def _order(finding: Finding) -> tuple[Any, ...]:
    """Where a finding stands among the listed: its store, then its row id (as a number when it
    is one), then everything the report shows of it, so that which findings are listed does not
    depend on the order the rows came in (nor on ``--jobs``)."""
    row, cert = finding.row, finding.cert
    digits = row.row_id.removeprefix("-")
    number = int(row.row_id) if digits.isascii() and digits.isdigit() else None
    return (row.store, number is None, number or 0, row.row_id, row.when or _NEVER,
            finding.verdict, finding.sender, finding.recipient, finding.signer, finding.detail,
            cert.fingerprint if cert else "", (cert.signed_at if cert else None) or _NEVER)


@dataclass
class Report:
    sources: list[str]
    conversations: dict[tuple[str, str], Conversation] = field(default_factory=dict)
    rows: int = 0
    max_findings: int = 200
    failing: int = 0  # problem rows, listed or not
    missing: list[str] = field(default_factory=list)  # source tables that do not exist
    _kept: list[tuple[tuple[Any, ...], Finding]] = field(default_factory=list, repr=False)

    @property
    def findings(self) -> list[Finding]:
        """The first ``max_findings`` problems in :func:`_order`."""
        self._trim()
        return [finding for _, finding in self._kept]

    @property
    def unlisted(self) -> int:
        """Problems beyond ``max_findings``: counted, not kept."""
        return self.failing - len(self.findings)

    def _trim(self) -> None:
        self._kept.sort(key=itemgetter(0))
        del self._kept[self.max_findings:]

    def add(self, finding: Finding) -> None:
        self.tally(finding.sender, finding.recipient, hash(finding.key), finding.verdict,
                   finding.row.when, finding if finding.verdict in FAILING else None)

    def tally(self, a: str, b: str, key: int, verdict: str, when: dt.datetime | None,
              failing: Finding | None) -> None:
        """Count one row: its conversation (peers ``a`` and ``b``), the ``hash`` of its
        finding's key, its verdict and time, and the finding itself when it is a problem
        (``failing``). A message stored in several rows counts once per verdict: stored twice
        alike, once; a tampered, unverified or readable copy beside a clean one, under both.
        Every row goes on the timeline at its time. Nothing here depends on the rows' order."""
        self.rows += 1
        peers = (a, b) if a <= b else (b, a)
        conv = self.conversations.get(peers)
        if conv is None:
            conv = self.conversations[peers] = Conversation(peers)
        conv.rows += 1
        seen, bit = conv.keys.get(key, 0), _BIT[verdict]
        if not seen & bit:  # a message counts once under each verdict any of its rows got
            conv.keys[key] = seen | bit
            conv.counts[verdict] += 1
        if when:
            conv.timeline.add(when, verdict)
            if conv.first is None or when < conv.first:
                conv.first = when
            if conv.last is None or when > conv.last:
                conv.last = when
        if failing is not None:
            self.failing += 1
            self._kept.append((_order(failing), failing))
            if len(self._kept) >= 2 * self.max_findings:
                self._trim()

    def missing_table(self, table: str, detail: str) -> None:
        self.missing.append(f"{table}: {detail}")

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(VERDICTS, 0)
        for conv in self.conversations.values():
            for verdict, n in conv.counts.items():
                out[verdict] += n
        return out
