"""Audit what a server stored: classify every stored message and verify every capsule.

No private key is involved: a capsule's signature is checked with the sender's signing
certificate only (from a bundle or PEP), so a third party can prove who sent what, and see
that the server holds ciphertext. Rows stream through; what is kept is per conversation: the
tallies, a bounded timeline and one hash per message (to count a message stored in several
rows once), plus a bounded cache of verdicts per distinct capsule.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509

from capsule import core, elements, wire
from capsule import namespaces as ns
from capsule.audit.findings import CertFacts, Finding, Report, StoredRow
from capsule.errors import CapsuleError, UntrustedCertificate
from capsule.stanza import FALLBACK_BODY
from capsule.trust import TrustStore, VerifiedCert

CAPSULE_TAG = f"{{{ns.NAMESPACE}}}capsule"
V1_CAPSULE_TAG = f"{{{ns.V1_NAMESPACE}}}capsule"
CAPSULE_OPEN, CAPSULE_CLOSE = "<capsule xmlns=", "</capsule>"
CAPSULE_NS_VALUES = tuple(f"{quote}{namespace}{quote}" for namespace in (ns.NAMESPACE, ns.V1_NAMESPACE)
                          for quote in "\"'")
SPAN_TAG = "capsule-audit-span"  # takes a capsule's place while the rest of its row is parsed
SPAN_ELEMENT = f"<{SPAN_TAG} xmlns=''/>"
SEEN_MAX = 2000  # verdicts remembered, keyed by their capsule (~2 KB each)
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
MESSAGE_ATTRIBUTES = frozenset({"to", "from", "id", "type", XML_LANG})
SERVER_NOTES = frozenset({"Offline Storage"})  # the one <delay/> text a server writes (ejabberd)


@dataclass(frozen=True, slots=True)
class Judgement:
    """What one capsule's signed bytes and signature come to; shared by every row storing it."""

    verdict: str
    detail: str
    signer: str  # the header's sender
    key: str  # identifies the message across the rows that store it ("": unreadable)
    cert: CertFacts | None
    recipients: frozenset[str] = frozenset()  # the JIDs the capsule has a <key> for


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


def _here(row: StoredRow) -> str:
    """The key of a finding that only its row identifies."""
    return f"row {row.store} {row.row_id}"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def readable(msg: ET.Element, column: str, encrypted: bool,
             marker: ET.Element | None = None) -> str:
    """What a person could read in a stored message outside its capsules, in words ("" if
    nothing). Capsule elements (and the fast path's ``marker`` in one's place) are skipped.
    When the message holds a capsule (``encrypted``), one attribute-less ``<body>`` holding
    exactly the fallback text is allowed, and so is ``column`` (the body the server stored)
    holding that text. Anything else is readable: text anywhere (but a server's
    :data:`SERVER_NOTES`), an attribute on the message (but :data:`MESSAGE_ATTRIBUTES`) or on an
    element not on the plugin's allow-list (:func:`capsule.elements.outside`) nor inside one."""
    fallback = encrypted
    if column and not column.isspace() and not (fallback and column.strip() == FALLBACK_BODY):
        return "the stored body column"
    if not MESSAGE_ATTRIBUTES.issuperset(msg.attrib):
        return "an attribute on <message>"
    if _visible(msg.text):
        return "text in <message>"
    body = _body_tag(msg.tag)
    outside = elements.outside_tag
    stack = [(child, False) for child in reversed(msg)]
    while stack:
        node, quiet = stack.pop()
        tag = node.tag
        if _visible(node.tail):
            return f"text after <{_local(tag)}>"
        if node is marker or tag == CAPSULE_TAG or tag == V1_CAPSULE_TAG:
            continue
        text = node.text
        if (fallback and tag == body and text == FALLBACK_BODY and not node.attrib
                and not len(node)):
            fallback = False  # the fallback once, exactly
            continue
        quiet = quiet or outside(tag)
        if text and not text.isspace() and not (quiet and text.strip() in SERVER_NOTES):
            return f"text in <{_local(tag)}>"
        if node.attrib and not quiet:
            return f"attributes on <{_local(tag)}>"
        if len(node):
            stack.extend((child, quiet) for child in reversed(node))
    return ""


def _visible(text: str | None) -> bool:
    """Whether text holds anything but whitespace (without copying it, as strip() would)."""
    return bool(text and not text.isspace())


@lru_cache(maxsize=64)
def _body_tag(message_tag: str) -> str:
    """The <body> tag in a message's namespace (the tag itself when it has none)."""
    return message_tag[:-len(_local(message_tag))] + "body"


ElementKey = tuple[tuple[str, str | None, str | None, tuple[tuple[str, str], ...], int], ...]


def element_key(element: ET.Element) -> ElementKey:
    """What a capsule's verdict is keyed by: the parsed element itself, every tag, text, tail
    inside it, attribute and child count in document order (all that :func:`parse_capsule`
    reads and checks). Rows share a verdict only when they hold the same capsule as parsed,
    however the stored text writes it; the verdict cache compares keys for equality, so no hash
    collision can make two capsules share one."""
    return tuple([(node.tag, node.text, None if node is element else node.tail,
                   tuple(node.attrib.items()), len(node)) for node in element.iter()])


def capsule_span(text: str) -> tuple[int, int] | None:
    """Where a stored stanza writes its capsule as ``<capsule xmlns='urn:capsule:0' …>`` (or
    ``urn:capsule:1``) up to the first ``</capsule>`` after it, or None (then the whole stanza
    is parsed).

    Such text, if it parses on its own, is the same element wherever it stands: the element
    sets its own default namespace, a prefix it does not bind fails the parse, and with DTDs
    refused no entity can mean anything else. That the text stands where an element may start
    (not inside a processing instruction, say) shows when the marker put in its place parses as
    the message's child: the text before it is the same, so the parser is in the same state
    there. The marker must therefore occur nowhere else in the stanza."""
    start = text.find(CAPSULE_OPEN)
    if start < 0 or SPAN_TAG in text:
        return None
    after = start + len(CAPSULE_OPEN)
    if not any(text.startswith(value, after) for value in CAPSULE_NS_VALUES):
        return None
    end = text.find(CAPSULE_CLOSE, after)
    return None if end < 0 else (start, end + len(CAPSULE_CLOSE))


class StanzaReader:
    """Parses stored stanzas one after another with one long-lived expat parser, which saves
    building a parser per row. A row counts only if it came out as exactly one element, with
    no text around it, followed by a sentinel element fed after it (so the row left nothing
    open or pending in the parser); anything else is parsed again on its own with
    ``ET.fromstring``, which decides and names the error. The result is what ``ET.fromstring``
    would give.

    The parser reports no events (one per element would cost a Python step each): the element
    rows are parsed into is opened on the tree builder by hand, then by the parser inside it.
    """

    SENTINEL = "capsule-audit-row-end"
    END = f"<{SENTINEL}/>"

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        builder = ET.TreeBuilder()
        outer = builder.start("outer", {})
        self._parser = ET.XMLParser(target=builder)  # noqa: S314 - the caller refuses DTDs
        self._parser.feed("<rows>")
        self._root = outer[0]
        self._flush = getattr(self._parser, "flush", None)  # expat >= 2.6 defers big tokens

    def parse(self, text: str) -> ET.Element:
        """The stanza's element; raises ``ET.ParseError`` as ``ET.fromstring`` would."""
        root = self._root
        try:
            self._parser.feed(text + self.END)
            if self._flush is not None:
                self._flush()
        except ET.ParseError:
            pass
        else:
            if (len(root) == 2 and root[1].tag == self.SENTINEL and not (root.text or "").strip()
                    and not (root[0].tail or "").strip()):
                element = root[0]
                del root[:]
                root.text = element.tail = None
                return element
        self._reset()
        return ET.fromstring(text)  # noqa: S314 - the caller refused DTDs


class Auditor:
    """Classifies rows and verifies capsules against a CA root, with certificates only."""

    def __init__(self, ca_root: bytes, bundle: CertificateBundle, crl: bytes | None = None,
                 fetch: Callable[[str], list[bytes]] | None = None):
        """``fetch(jid)`` finds certificates the bundle lacks (PEP, the CA's look-up)."""
        self._at = dt.datetime.now(dt.UTC)
        # a certificate is checked once, at a moment inside its validity window; whether each
        # capsule was signed inside that window is checked per capsule (CertFacts)
        self.trust = TrustStore(ca_root, crl, clock=lambda: self._at)
        self.bundle = bundle
        self.fetch = fetch
        self._fetched: set[str] = set()
        self._certs: dict[tuple[str, str], tuple[VerifiedCert | None, CertFacts, str]] = {}
        self._seen: dict[ElementKey, Judgement] = {}  # element_key -> its judgement
        self._spans: dict[str, Judgement] = {}  # a capsule's text (capsule_span) -> judgement
        self._reader = StanzaReader()

    def examine(self, row: StoredRow) -> Finding:
        if "<!" in row.stanza:
            return Finding(row, "malformed", "", row.owner, _here(row),
                           "stanza holds a DTD or comment")
        span = capsule_span(row.stanza)
        if span is not None:
            finding = self._examine_span(row, *span)
            if finding is not None:
                return finding
        return self.examine_whole(row)

    def _examine_span(self, row: StoredRow, start: int, end: int) -> Finding | None:
        """The fast path: the capsule's text, cut out by :func:`capsule_span`, is looked up as
        it is (and parsed on its own once); the rest of the row is parsed with an empty element
        in its place, which must come out as the message's only capsule-like child. None when
        anything is off: then the whole row is parsed and decides."""
        text = row.stanza
        capsule = text[start:end]
        judgement = self._spans.get(capsule)
        if judgement is None:
            try:
                element = ET.fromstring(capsule)  # noqa: S314 - the caller refused DTDs
            except ET.ParseError:
                return None
            judgement = self._judgement(element)  # a v0 or v1 capsule: see capsule_span
            if len(self._spans) >= SEEN_MAX:
                self._spans.clear()
            self._spans[capsule] = judgement
        try:
            msg = self._reader.parse(text[:start] + SPAN_ELEMENT + text[end:])
        except ET.ParseError:
            return None
        marker = msg.find(SPAN_TAG)
        if marker is None or next(msg.iter(CAPSULE_TAG), None) is not None or next(
                msg.iter(V1_CAPSULE_TAG), None) is not None:
            return None  # another capsule, or this one nested elsewhere
        return self._finding(row, msg, marker, judgement, 1)

    def examine_whole(self, row: StoredRow) -> Finding:
        """The reference path: the whole stanza parsed (DTDs refused by the caller)."""
        try:
            msg = self._reader.parse(row.stanza)
        except ET.ParseError as exc:
            return Finding(row, "malformed", "", row.owner, _here(row),
                           f"unparseable stanza: {exc}")
        capsules = sum(1 for _ in msg.iter(CAPSULE_TAG)) + sum(
            1 for _ in msg.iter(V1_CAPSULE_TAG))
        if not capsules:
            sender, recipient = _bare(msg.get("from")) or row.owner, _bare(msg.get("to"))
            leak = readable(msg, row.column, False)
            key = f"{sender}>{recipient}#{msg.get('id') or row.store + row.row_id}"
            return Finding(row, "plaintext" if leak else "other", sender, recipient, key, leak)
        element = msg.find(CAPSULE_TAG)
        element = msg.find(V1_CAPSULE_TAG) if element is None else element
        judgement = None if element is None else self._judgement(element)
        return self._finding(row, msg, element, judgement, capsules)

    def _judgement(self, element: ET.Element) -> Judgement:
        parsed = element_key(element)
        seen = self._seen.get(parsed)
        if seen is None:
            if len(self._seen) >= SEEN_MAX:  # bounded: a row stored twice sits close by
                self._seen.clear()
            seen = self._seen[parsed] = self._judge(element)
        return seen

    @staticmethod
    def _finding(row: StoredRow, msg: ET.Element, capsule: ET.Element | None,
                 seen: Judgement | None, capsules: int) -> Finding:
        """A capsule row's finding: nothing readable beside the capsule (``capsule``, a child
        of ``msg``; None when the message's capsules are all nested deeper), the message's one
        capsule (of ``capsules``), its judgement, checked against who stored it for whom."""
        sender, recipient = _bare(msg.get("from")) or row.owner, _bare(msg.get("to"))
        leak = readable(msg, row.column, True, capsule)
        if leak:  # counted apart from the clean copies of the same message
            key = f"{seen.key} plaintext" if seen and seen.key else _here(row)
            return Finding(row, "plaintext", sender, recipient, key, f"{leak} beside a capsule")
        if seen is None or capsules > 1:
            return Finding(row, "malformed", sender, recipient, _here(row),
                           f"{capsules} capsules in one message" if capsules > 1
                           else "capsule nested inside another element")
        if not seen.key:  # unreadable: no message to count it under but this row
            return Finding(row, seen.verdict, sender, recipient, _here(row), seen.detail)
        verdict, detail = seen.verdict, seen.detail
        if verdict != "malformed" and seen.signer != sender:
            verdict, detail = "sender-mismatch", f"stored from {sender}, capsule signed as " \
                                                 f"{seen.signer}"
        elif verdict in ("capsule", "unverified") and (recipient == sender
                                                        or recipient not in seen.recipients):
            verdict, detail = "recipient-mismatch", f"stored to {recipient or 'nobody'}, " \
                f"capsule keyed for {', '.join(sorted(seen.recipients - {sender}))}"
        return Finding(row, verdict, sender, recipient, seen.key, detail, seen.signer, seen.cert)

    def _judge(self, element: ET.Element) -> Judgement:
        try:
            capsule = wire.parse(element)
            wire.check_shape(capsule)
        except CapsuleError as exc:
            return Judgement("malformed", str(exc), "", "", None)
        h = capsule.header
        key = f"capsule {h.sender} {h.nid.hex()}"
        keyed = frozenset(k.jid for k in h.keys)
        signer, facts, problem = self._certificate(h.cert, h.sender)
        facts = dataclasses.replace(facts, signed_at=core.timestamp_datetime(h.ts))
        if signer is None:
            return Judgement("unverified", problem, h.sender, key, facts, keyed)
        try:
            wire.verify(capsule, signer.public_key)
        except CapsuleError as exc:
            verdict = "bad-signature" if exc.reason == "bad-signature" else "malformed"
            return Judgement(verdict, str(exc), h.sender, key, facts, keyed)
        if not facts.valid_at_signing:
            return Judgement("unverified", f"signed at {h.ts}, outside the certificate's "
                             f"validity ({facts.not_before:%Y-%m-%d} to "
                             f"{facts.not_after:%Y-%m-%d})", h.sender, key, facts, keyed)
        return Judgement("capsule", "", h.sender, key, facts, keyed)

    def _certificate(self, fingerprint: str, sender: str
                     ) -> tuple[VerifiedCert | None, CertFacts, str]:
        """The signing certificate named by ``fingerprint``, checked once per run for
        ``sender``: (the verified certificate or None, its facts, why not)."""
        cached = self._certs.get((fingerprint, sender))
        if cached is not None:
            return cached
        pem = self.bundle.by_fingerprint.get(fingerprint)
        if pem is None and self.fetch is not None and sender not in self._fetched:
            self._fetched.add(sender)  # asked once per sender and run
            for found in self.fetch(sender):
                self.bundle.add_pem(found)
            pem = self.bundle.by_fingerprint.get(fingerprint)
        if pem is None:
            result: tuple[VerifiedCert | None, CertFacts, str] = (
                None, CertFacts(fingerprint), f"no certificate {fingerprint[:16]}… for {sender}")
        else:
            cert = x509.load_pem_x509_certificate(pem)
            facts = CertFacts(fingerprint, f"{cert.serial_number:X}", cert.not_valid_before_utc,
                              cert.not_valid_after_utc)
            self._at = cert.not_valid_before_utc
            try:
                result = self.trust.verify(pem, sender, "sign"), facts, ""
            except UntrustedCertificate as exc:
                result = None, facts, str(exc)
        self._certs[(fingerprint, sender)] = result
        return result

    def run(self, rows: Iterable[StoredRow], report: Report,
            progress: Iterator[None] | None = None) -> Report:
        for row in rows:
            report.add(self.examine(row))
            if progress is not None:
                next(progress)
        return report
