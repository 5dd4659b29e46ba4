"""The XEP-0420-style envelope: what the capsule's payload decrypts to. Pure XML, no XMPP.

``<envelope xmlns='urn:xmpp:sce:1'><content>…</content><rpad>…</rpad><time stamp='…'/>
<to jid='…'/>…<from jid='…'/></envelope>`` — one ``<to>`` per recipient. The receiver checks
from/to against the header and the stanza, so a capsule cannot be re-sent under another name,
and reads it within size and depth limits.
"""

from __future__ import annotations

import base64
import os
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from capsule import algorithms as alg
from capsule import core, elements, v1
from capsule import namespaces as ns
from capsule.errors import EnvelopeMismatch, MalformedCapsule, UninterpretableContent
from capsule.fastxml import escape

_NS = "{" + ns.SCE_NAMESPACE + "}"
MAX_BYTES = 128 * 1024  # an envelope larger than this is refused before decryption
MAX_DEPTH = 32  # envelope, content, then XHTML-IM nesting; deeper is refused
_OPEN = f'<envelope xmlns="{ns.SCE_NAMESPACE}"><content>'
_PARTS = frozenset(_NS + part for part in ("content", "rpad", "time", "to", "from"))


@dataclass(frozen=True)
class Envelope:
    content: tuple[ET.Element, ...]  # the protected child elements (a <body>, …)
    sender: str
    recipients: tuple[str, ...]
    time: str


def encode(content: Sequence[ET.Element], sender: str, recipients: Sequence[str], time: str) -> bytes:
    """Serialise an envelope with fresh random padding (0..RPAD_MAX characters).

    Written out directly but the content, which ElementTree serialises element by element
    (all of it, namespaced attributes too: slixmpp's serialiser drops those without a
    stream); one ``tostring`` of the whole tree cost ≈ 90 µs per capsule."""
    pad = base64.b64encode(os.urandom(secrets.randbelow(alg.RPAD_MAX // 4 * 3 + 1))).decode()
    parts = [_OPEN, *(ET.tostring(element, encoding="unicode") for element in content),
             "</content><rpad>", pad, "</rpad>", f'<time stamp="{escape(time)}"/>',
             *(f'<to jid="{escape(jid)}"/>' for jid in recipients),
             f'<from jid="{escape(sender)}"/></envelope>']
    return "".join(parts).encode()


def decode(data: bytes, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Envelope:
    """Parse an envelope within size and nesting limits; refuses DTDs and entities (no
    expansion attacks inside a capsule) and content the receiver cannot interpret."""
    if len(data) > max_bytes:
        raise MalformedCapsule(f"envelope of {len(data)} bytes exceeds the limit of {max_bytes}")
    if b"<!" in data or b"<?" in data:
        raise MalformedCapsule("envelope contains a DTD, entity, comment, CDATA section or "
                               "processing instruction")
    parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("start", "end"))
    depth = 0
    root: ET.Element | None = None
    try:
        parser.feed(data)  # the tree is built without recursion; nothing recursive runs before
        parser.close()  # the depth is known to be bounded
        for event, element in cast(Iterator[tuple[str, ET.Element]], parser.read_events()):
            root = element if root is None else root
            depth += 1 if event == "start" else -1
            if depth > max_depth:
                raise MalformedCapsule(f"envelope nests deeper than {max_depth} elements")
    except ET.ParseError as exc:
        raise MalformedCapsule(f"envelope is not well-formed XML: {exc}") from None
    if root is None:
        raise MalformedCapsule("envelope is empty")
    if root.tag != _NS + "envelope":
        raise MalformedCapsule(f"payload is not an SCE envelope but {root.tag}")
    tags = [child.tag for child in root]
    for part, low, high in (("content", 1, 1), ("rpad", 0, 1), ("time", 1, 1), ("from", 1, 1)):
        if not low <= tags.count(_NS + part) <= high:
            raise MalformedCapsule(f"envelope holds {tags.count(_NS + part)} <{part}/>")
    if any(tag not in _PARTS for tag in tags):
        raise MalformedCapsule("envelope holds an element the format does not define")
    content = root.find(_NS + "content")
    sender = root.find(_NS + "from")
    time = root.find(_NS + "time")
    if content is None or sender is None or time is None or not sender.get("jid"):
        raise MalformedCapsule("envelope lacks content, from or time")
    recipients = tuple(el.get("jid", "") for el in root.findall(_NS + "to"))
    if not recipients or "" in recipients:
        raise MalformedCapsule("envelope names no recipient")
    return Envelope(_interpret(content), sender.get("jid", ""), recipients, time.get("stamp", ""))


def _interpret(holder: ET.Element) -> tuple[ET.Element, ...]:
    """The content a receiver delivers: protected elements only (routing and server metadata
    never come from inside); refuses what it cannot read rather than deliver it empty."""
    delivered = []
    for child in holder:
        ns, local = elements.name(child)
        if elements.outside(child):
            continue
        if not ns or (local in elements.INTERPRETED and ns != elements.CLIENT):
            raise UninterpretableContent(f"envelope holds <{local}> in namespace '{ns}', "
                                         f"which no receiver can read as a message")
        delivered.append(child)
    if not any(elements.readable_element(child) for child in delivered):
        raise UninterpretableContent("envelope holds no readable content")
    return tuple(delivered)


def check_addressing(env: Envelope, header: core.Header | v1.Header, stanza_from: str,
                     stanza_to: str,
                     me: str, room: str | None = None) -> None:
    """from = header sender = stanza sender; the envelope's addressees are exactly the keyed
    recipients (the sender aside), plus the room for a group chat; the stanza's addressee and
    we are among them.

    ``stanza_from``/``stanza_to`` are bare JIDs (in a room: the signer's real JID, the room).
    Our own capsules (carbons, MAM) come back with us as sender; then we need not be among the
    recipients.
    """
    sender = header.sender
    if env.sender != sender:
        raise EnvelopeMismatch(f"envelope from {env.sender} but header sender {sender}")
    if stanza_from != sender:
        raise EnvelopeMismatch(
            f"capsule signed by {sender} arrived from {stanza_from}: forwarded or spoofed"
        )
    addressees = set(env.recipients) - {sender}
    if room is not None:
        if room not in addressees:
            raise EnvelopeMismatch(f"the capsule is not addressed to the room {room}")
        addressees.discard(room)
    if addressees != {key.jid for key in header.keys} - {sender}:
        raise EnvelopeMismatch("the envelope's addressees are not the capsule's keyed recipients")
    if stanza_to not in env.recipients:
        raise EnvelopeMismatch(f"stanza to {stanza_to} is not among the envelope's recipients")
    if me != sender and me not in env.recipients:
        raise EnvelopeMismatch(f"the envelope is not addressed to {me}")
