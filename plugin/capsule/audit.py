"""Audit what a server stored: classify every stored message and verify every capsule.

No private key is involved: a capsule's signature is checked with the sender's signing
certificate only (from a bundle or PEP), so a third party can prove who sent what, and see
that the server holds ciphertext. Rows stream through in constant memory; only the
per-conversation tallies are kept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from capsule import algorithms as alg
from capsule import core
from capsule.errors import CapsuleError, UntrustedCertificate
from capsule.stanza import parse_capsule
from capsule.trust import TrustStore, VerifiedCert

CAPSULE_TAG = f"{{{alg.NAMESPACE}}}capsule"
VERDICTS = ("plaintext", "capsule", "bad-signature", "sender-mismatch", "unverified",
            "malformed", "other")
SEEN_MAX = 20000  # verdicts remembered per capsule digest
FAILING = ("plaintext", "bad-signature", "sender-mismatch", "unverified", "malformed")


@dataclass(frozen=True)
class StoredRow:
    """One row a server stored: where, whose, when, and the stanza as text."""

    store: str  # e.g. "ejabberd archive", "openfire ofOffline"
    row_id: str
    owner: str  # the account whose archive or queue holds it ("" if none)
    when: dt.datetime | None
    stanza: str


@dataclass(frozen=True)
class Finding:
    row: StoredRow
    verdict: str
    sender: str
    recipient: str
    key: str  # identifies the message across the rows that store it
    detail: str = ""


@dataclass
class Conversation:
    peers: tuple[str, str]
    rows: int = 0
    keys: set[int] = field(default_factory=set)  # hashes of message keys: ~60 bytes each
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    first: dt.datetime | None = None
    last: dt.datetime | None = None

    @property
    def messages(self) -> int:
        return len(self.keys)

    @property
    def verdict(self) -> str:
        c = self.counts
        if c["bad-signature"] or c["sender-mismatch"]:
            return "TAMPERED"
        if c["plaintext"]:
            return "PLAINTEXT"
        if c["unverified"] or c["malformed"]:
            return "UNVERIFIED"
        return "ENCRYPTED" if c["capsule"] else "OTHER"


@dataclass
class Report:
    sources: list[str]
    conversations: dict[tuple[str, str], Conversation] = field(default_factory=dict)
    rows: int = 0
    findings: list[Finding] = field(default_factory=list)  # problems only, capped
    max_findings: int = 200

    def add(self, finding: Finding) -> None:
        self.rows += 1
        a, b = sorted((finding.sender, finding.recipient))
        conv = self.conversations.get((a, b))
        if conv is None:
            conv = self.conversations[(a, b)] = Conversation((a, b))
        conv.rows += 1
        key = hash(finding.key)
        if key not in conv.keys:
            conv.keys.add(key)
            conv.counts[finding.verdict] += 1
        elif finding.verdict in ("bad-signature", "sender-mismatch"):
            conv.counts[finding.verdict] += 1  # a tampered copy of a message stored twice
        when = finding.row.when
        if when:
            conv.first = min(conv.first or when, when)
            conv.last = max(conv.last or when, when)
        if finding.verdict in FAILING and len(self.findings) < self.max_findings:
            self.findings.append(finding)

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(VERDICTS, 0)
        for conv in self.conversations.values():
            for verdict, n in conv.counts.items():
                out[verdict] += n
        return out


class CertificateBundle:
    """Signing certificates by SHA-256 fingerprint, from PEM files or directories."""

    def __init__(self) -> None:
        self.by_fingerprint: dict[str, bytes] = {}

    def add_pem(self, data: bytes) -> int:
        added = 0
        for block in data.split(b"-----END CERTIFICATE-----"):
            start = block.find(b"-----BEGIN CERTIFICATE-----")
            if start < 0:
                continue
            pem = block[start:] + b"-----END CERTIFICATE-----\n"
            try:
                cert = x509.load_pem_x509_certificate(pem)
            except ValueError:
                continue
            fp = core.cert_fingerprint(cert)
            self.by_fingerprint[fp] = pem
            added += 1
        return added

    def add_path(self, path: Path) -> int:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return sum(self.add_pem(f.read_bytes()) for f in files if f.suffix in (".pem", ".crt"))


def _bare(jid: str | None) -> str:
    return (jid or "").split("/", 1)[0]


class Auditor:
    """Classifies rows and verifies capsules against a CA root, with certificates only."""

    def __init__(self, ca_root: bytes, bundle: CertificateBundle, crl: bytes | None = None,
                 fetch: Callable[[str], list[bytes]] | None = None):
        """``fetch(jid)`` finds certificates the bundle lacks (PEP, the CA's look-up)."""
        self._at = dt.datetime.now(dt.UTC)
        # certificates are judged at the time the capsule says it was sealed
        self.trust = TrustStore(ca_root, crl, clock=lambda: self._at)
        self.bundle = bundle
        self.fetch = fetch
        self._fetched: set[str] = set()
        self._seen: dict[bytes, tuple[str, str, str, str]] = {}  # capsule digest -> _judge()

    def examine(self, row: StoredRow) -> Finding:
        if "<!" in row.stanza:
            return Finding(row, "malformed", "", row.owner, f"row {row.store} {row.row_id}",
                           "stanza holds a DTD or comment")
        try:
            msg = ET.fromstring(row.stanza)  # noqa: S314 - DTDs refused above
        except ET.ParseError as exc:
            return Finding(row, "malformed", "", row.owner, f"row {row.store} {row.row_id}",
                           f"unparseable stanza: {exc}")
        sender, recipient = _bare(msg.get("from")), _bare(msg.get("to"))
        sender = sender or row.owner
        element = next((c for c in msg if c.tag == CAPSULE_TAG), None)
        if element is None:
            body = next((c for c in msg if c.tag.rsplit("}", 1)[-1] == "body"), None)
            verdict = "plaintext" if body is not None and (body.text or "").strip() else "other"
            key = f"{sender}>{recipient}#{msg.get('id') or row.store + row.row_id}"
            return Finding(row, verdict, sender, recipient, key)
        return self._capsule(row, element, sender, recipient)

    def _capsule(self, row: StoredRow, element: ET.Element, sender: str, recipient: str
                 ) -> Finding:
        # the same capsule stored in several rows is verified once: key the verdict by the
        # capsule's text as stored (a tampered copy differs, and is verified on its own)
        begin, end = row.stanza.find("<capsule"), row.stanza.rfind("</capsule>")
        digest = hashlib.sha256(row.stanza[begin:end].encode()).digest()
        seen = self._seen.get(digest)
        if seen is None:
            if len(self._seen) >= SEEN_MAX:  # bounded: a row stored twice sits close by
                self._seen.clear()
            seen = self._seen[digest] = self._judge(element)
        verdict, detail, signer, key = seen
        if verdict != "malformed" and signer != sender:
            return Finding(row, "sender-mismatch", sender, recipient, key,
                           f"stored from {sender}, capsule signed as {signer}")
        return Finding(row, verdict, sender, recipient, key, detail)

    def _judge(self, element: ET.Element) -> tuple[str, str, str, str]:
        """(verdict, detail, header sender, message key) of one capsule."""
        try:
            capsule = parse_capsule(element)
            core.check_shape(capsule)
        except CapsuleError as exc:
            return "malformed", str(exc), "", f"malformed {id(element)}"
        verdict, detail = self._verify(capsule)
        key = f"capsule {capsule.header.sender} {capsule.header.nid.hex()}"
        return verdict, detail, capsule.header.sender, key

    def _verify(self, capsule: core.Capsule) -> tuple[str, str]:
        h = capsule.header
        pem = self.bundle.by_fingerprint.get(h.cert)
        if pem is None and self.fetch is not None and h.sender not in self._fetched:
            self._fetched.add(h.sender)  # asked once per sender and run
            for found in self.fetch(h.sender):
                self.bundle.add_pem(found)
            pem = self.bundle.by_fingerprint.get(h.cert)
        if pem is None:
            return "unverified", f"no certificate {h.cert[:16]}… for {h.sender}"
        try:
            self._at = dt.datetime.strptime(h.ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
            signer: VerifiedCert = self.trust.verify(pem, h.sender, "sign")
        except (UntrustedCertificate, ValueError) as exc:
            return "unverified", str(exc)
        try:
            core.verify(capsule, signer.public_key)
        except CapsuleError as exc:
            return ("bad-signature" if exc.reason == "bad-signature" else "malformed"), str(exc)
        return "capsule", ""

    def run(self, rows: Iterable[StoredRow], report: Report,
            progress: Iterator[None] | None = None) -> Report:
        for row in rows:
            report.add(self.examine(row))
            if progress is not None:
                next(progress)
        return report
