"""Stanza classes of ``urn:capsule:1`` (wire format v1) and of the PEP session-key node.

Capsule builds and reads these elements with ElementTree directly, once per element: no
``ElementBase`` interface lookups per field (README, "Protocol (wire format v1)"). Reading is
strict: base64 is canonical (standard, padded, no whitespace), the shape is exactly the
documented one, and anything else is MalformedCapsule.
"""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET
from typing import ClassVar

from slixmpp import Message
from slixmpp.plugins.xep_0060.stanza import Item
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from capsule import namespaces as ns
from capsule import v1
from capsule.errors import MalformedCapsule
from capsule.sessions import SessionRecord
from capsule.stanza import FALLBACK_BODY

NS = "{" + ns.V1_NAMESPACE + "}"
SNS = "{" + ns.SESSIONS_NODE + "}"
_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?", re.ASCII)
_HEX = re.compile(r"[0-9a-f]{64}", re.ASCII)


class CapsuleV1(ElementBase):
    """``<capsule xmlns='urn:capsule:1'>``: header, payload, signature (built by :func:`build`)."""

    name = "capsule"
    namespace = ns.V1_NAMESPACE
    plugin_attrib = "capsule1"
    interfaces: ClassVar[set[str]] = set()


class Sessions(ElementBase):
    """The PEP item payload of node ``urn:capsule:sessions:1``: signed session records."""

    name = "sessions"
    namespace = ns.SESSIONS_NODE
    plugin_attrib = "capsule_sessions"
    interfaces: ClassVar[set[str]] = set()


def register() -> None:
    register_stanza_plugin(Message, CapsuleV1)
    register_stanza_plugin(Item, Sessions)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str | None, what: str) -> bytes:
    """Canonical base64 only: standard alphabet, padded, no whitespace, zero trailing bits."""
    text = text or ""
    if not _B64.fullmatch(text):
        raise MalformedCapsule(f"<{what}> is not canonical base64")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedCapsule(f"<{what}> is not canonical base64") from None
    if base64.b64encode(data).decode() != text:
        raise MalformedCapsule(f"<{what}> is not canonical base64")
    return data


def build(capsule: v1.Capsule) -> ET.Element:
    """The ``<capsule/>`` element of a sealed v1 capsule."""
    h = capsule.header
    root = ET.Element(NS + "capsule")
    header = ET.SubElement(root, NS + "header", {
        "sender": h.sender, "cert": h.cert, "nid": b64(h.nid), "ts": h.ts, "epk": b64(h.epk)})
    for key in h.keys:
        ET.SubElement(header, NS + "key", {"jid": key.jid, "sid": b64(key.sid)}).text = b64(
            key.wrapped)
    ET.SubElement(header, NS + "iv").text = b64(h.iv)
    ET.SubElement(root, NS + "payload").text = b64(capsule.payload)
    ET.SubElement(root, NS + "signature").text = b64(capsule.signature)
    return root


def put(msg: Message, capsule: v1.Capsule) -> None:
    """Put a v1 capsule into ``msg`` beside the fallback body, EME and store hint (as v0)."""
    msg.xml.append(build(capsule))
    msg["body"] = FALLBACK_BODY
    msg["eme"]["namespace"] = ns.V1_NAMESPACE
    msg["eme"]["name"] = "Capsule"
    msg.enable("store")


def _only(node: ET.Element, attributes: set[str], children: list[str], what: str) -> None:
    if set(node.attrib) != attributes:
        raise MalformedCapsule(f"<{what}> has attributes {sorted(node.attrib)}, "
                               f"not {sorted(attributes)}")
    tags = sorted(child.tag for child in node)
    if tags != sorted(NS + c for c in children):
        raise MalformedCapsule(f"<{what}> holds {len(tags)} elements, not {children}")
    for child in node:
        if (child.tail or "").strip():
            raise MalformedCapsule(f"text after an element in <{what}>")
    if children and (node.text or "").strip():
        raise MalformedCapsule(f"text in <{what}>")


def parse(xml: ET.Element) -> v1.Capsule:
    """Read a ``<capsule xmlns='urn:capsule:1'/>`` of exactly the documented shape."""
    if xml.tag != NS + "capsule":
        raise MalformedCapsule(f"not a v1 capsule: {xml.tag}")
    _only(xml, set(), ["header", "payload", "signature"], "capsule")
    header = xml.find(NS + "header")
    assert header is not None  # _only checked
    keys = header.findall(NS + "key")
    _only(header, {"sender", "cert", "nid", "ts", "epk"}, ["iv"] + ["key"] * len(keys), "header")
    entries = []
    for key in keys:
        _only(key, {"jid", "sid"}, [], "key")
        entries.append(v1.KeyEntry(key.get("jid", ""), unb64(key.get("sid"), "key sid"),
                                   unb64(key.text, "key")))
    for leaf in (header.find(NS + "iv"), xml.find(NS + "payload"), xml.find(NS + "signature")):
        assert leaf is not None
        _only(leaf, set(), [], leaf.tag[len(NS):])
    if not _HEX.fullmatch(header.get("cert", "")):
        raise MalformedCapsule("the header's cert is not 64 lower-case hex characters")
    return v1.Capsule(
        header=v1.Header(
            sender=header.get("sender", ""), cert=header.get("cert", ""),
            nid=unb64(header.get("nid"), "nid"), ts=header.get("ts", ""),
            epk=unb64(header.get("epk"), "epk"), keys=tuple(entries),
            iv=unb64(header.findtext(NS + "iv"), "iv")),
        payload=unb64(xml.findtext(NS + "payload"), "payload"),
        signature=unb64(xml.findtext(NS + "signature"), "signature"),
    )


def build_sessions(records: list[SessionRecord]) -> ET.Element:
    """The ``<sessions/>`` PEP item payload for our current records."""
    root = ET.Element(SNS + "sessions")
    for r in records:
        ET.SubElement(root, SNS + "session", {
            "pub": b64(r.pub), "cert": r.cert, "created": r.created, "expires": r.expires,
        }).text = b64(r.signature)
    return root


def parse_sessions(xml: ET.Element) -> tuple[list[SessionRecord], int]:
    """The records of a ``<sessions/>`` payload and how many malformed ones were dropped
    (whether a record is *valid* is capsule.sessions.check's business)."""
    records, dropped = [], 0
    for node in xml:
        try:
            if node.tag != SNS + "session" or set(node.attrib) != {
                    "pub", "cert", "created", "expires"} or len(node):
                raise MalformedCapsule("not a session record")
            records.append(SessionRecord(unb64(node.get("pub"), "pub"), node.get("cert", ""),
                                         node.get("created", ""), node.get("expires", ""),
                                         unb64(node.text, "session")))
        except MalformedCapsule:
            dropped += 1
    return records, dropped
