"""The XEP-0420-style envelope: what the capsule's payload decrypts to. Pure XML, no XMPP.

``<envelope xmlns='urn:xmpp:sce:1'><content>…</content><rpad>…</rpad><time stamp='…'/>
<to jid='…'/>…<from jid='…'/></envelope>`` — one ``<to>`` per recipient. The receiver checks
from/to against the header and the stanza, so a capsule cannot be re-sent under another name.
"""

from __future__ import annotations

import base64
import os
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from capsule import algorithms as alg
from capsule.errors import EnvelopeMismatch, MalformedCapsule

_NS = "{" + alg.SCE_NAMESPACE + "}"


@dataclass(frozen=True)
class Envelope:
    content: tuple[ET.Element, ...]  # the protected child elements (a <body>, …)
    sender: str
    recipients: tuple[str, ...]
    time: str


def encode(content: Sequence[ET.Element], sender: str, recipients: Sequence[str], time: str) -> bytes:
    """Serialise an envelope with fresh random padding (0..RPAD_MAX characters)."""
    root = ET.Element(_NS + "envelope")
    holder = ET.SubElement(root, _NS + "content")
    holder.extend(content)
    pad = base64.b64encode(os.urandom(secrets.randbelow(alg.RPAD_MAX // 4 * 3 + 1)))
    ET.SubElement(root, _NS + "rpad").text = pad.decode()
    ET.SubElement(root, _NS + "time", stamp=time)
    for jid in recipients:
        ET.SubElement(root, _NS + "to", jid=jid)
    ET.SubElement(root, _NS + "from", jid=sender)
    ET.register_namespace("", alg.SCE_NAMESPACE)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return data


def decode(data: bytes) -> Envelope:
    """Parse an envelope; refuses DTDs and entities (no expansion attacks inside a capsule)."""
    if b"<!" in data:
        raise MalformedCapsule("envelope contains a DTD, entity or comment declaration")
    try:
        root = ET.fromstring(data)  # noqa: S314 - DTDs and entities refused above
    except ET.ParseError as exc:
        raise MalformedCapsule(f"envelope is not well-formed XML: {exc}") from None
    if root.tag != _NS + "envelope":
        raise MalformedCapsule(f"payload is not an SCE envelope but {root.tag}")
    content = root.find(_NS + "content")
    sender = root.find(_NS + "from")
    time = root.find(_NS + "time")
    if content is None or sender is None or time is None or not sender.get("jid"):
        raise MalformedCapsule("envelope lacks content, from or time")
    recipients = tuple(el.get("jid", "") for el in root.findall(_NS + "to"))
    if not recipients or "" in recipients:
        raise MalformedCapsule("envelope names no recipient")
    return Envelope(tuple(content), sender.get("jid", ""), recipients, time.get("stamp", ""))


def check_addressing(env: Envelope, header_sender: str, stanza_from: str, stanza_to: str,
                     me: str) -> None:
    """from = header sender = stanza sender; the stanza's addressee and we are among the to's.

    ``stanza_from``/``stanza_to`` are bare JIDs. Our own capsules (carbons, MAM) come back with
    us as sender; then we need not be among the recipients.
    """
    if env.sender != header_sender:
        raise EnvelopeMismatch(f"envelope from {env.sender} but header sender {header_sender}")
    if stanza_from != header_sender:
        raise EnvelopeMismatch(
            f"capsule signed by {header_sender} arrived from {stanza_from}: forwarded or spoofed"
        )
    if stanza_to not in env.recipients:
        raise EnvelopeMismatch(f"stanza to {stanza_to} is not among the envelope's recipients")
    if me != header_sender and me not in env.recipients:
        raise EnvelopeMismatch(f"the envelope is not addressed to {me}")
