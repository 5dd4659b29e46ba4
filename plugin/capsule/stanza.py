"""Stanza classes of ``urn:capsule:0`` (wire format v0) and of the PEP certificate node.

``msg['capsule']`` is the ``<capsule/>``; :func:`to_core`/:func:`from_core` convert to and from
the crypto core's :class:`capsule.core.Capsule`, rejecting bad base64 as MalformedCapsule.
"""

from __future__ import annotations

import base64
import binascii
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable

from slixmpp import Message
from slixmpp.plugins.xep_0060.stanza import Item
from slixmpp.plugins.xep_0334.stanza import Store
from slixmpp.plugins.xep_0380.stanza import Encryption
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from capsule import core
from capsule import namespaces as ns
from capsule.errors import MalformedCapsule, UnsupportedVersion

log = logging.getLogger(__name__)
FALLBACK_BODY = "This message is end-to-end encrypted with Capsule."


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None, what: str) -> bytes:
    try:
        return base64.b64decode((text or "").strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedCapsule(f"<{what}> is not valid base64") from None


class TextValue(ElementBase):
    """An element whose ``value`` interface is its text (base64 data)."""

    def get_value(self) -> str:
        return self.xml.text or ""

    def set_value(self, value: str) -> None:
        self.xml.text = value

    def del_value(self) -> None:
        self.xml.text = ""


class Key(TextValue):
    """``<key jid='…' cert='…'>base64 wrapped key</key>``"""

    name = "key"
    namespace = ns.NAMESPACE
    plugin_attrib = "key"
    plugin_multi_attrib = "keys"
    interfaces = {"jid", "cert", "value"}


class HeaderElement(ElementBase):
    """``<header sender cert nid ts>`` with the ``<key/>``s and the ``<iv/>``."""

    name = "header"
    namespace = ns.NAMESPACE
    plugin_attrib = "header"
    interfaces = {"sender", "cert", "nid", "ts", "iv"}
    sub_interfaces = {"iv"}


class CapsuleElement(ElementBase):
    """``<capsule xmlns='urn:capsule:0'>``: header, payload, signature."""

    name = "capsule"
    namespace = ns.NAMESPACE
    plugin_attrib = "capsule"
    interfaces = {"payload", "signature"}
    sub_interfaces = {"payload", "signature"}


class PublishedCert(TextValue):
    """``<cert usage='sign|encrypt|ca'>base64 DER</cert>`` inside a published ``<certs/>``."""

    name = "cert"
    namespace = ns.CERTS_NODE
    plugin_attrib = "cert"
    plugin_multi_attrib = "certs"
    interfaces = {"usage", "value"}


class Certs(ElementBase):
    """The PEP item payload of node ``urn:capsule:certs:0``: the account's certificate chain."""

    name = "certs"
    namespace = ns.CERTS_NODE
    plugin_attrib = "capsule_certs"


def certs_by_usage(children: Iterable[ElementBase], decode: Callable[[str], bytes]
                   ) -> dict[str, bytes]:
    """{usage: PEM} of ``<cert usage='…'/>`` (or ``<csr/>``) elements, each text turned into
    PEM by ``decode``; one it refuses (ValueError) is dropped, and logged."""
    found = {}
    for cert in children:
        try:
            found[cert["usage"]] = decode(cert["value"])
        except ValueError:
            log.warning("ignoring an undecodable %s certificate", cert["usage"])
    return found


def register() -> None:
    register_stanza_plugin(Message, CapsuleElement)
    register_stanza_plugin(Message, Encryption)
    register_stanza_plugin(Message, Store)
    register_stanza_plugin(CapsuleElement, HeaderElement)
    register_stanza_plugin(HeaderElement, Key, iterable=True)
    register_stanza_plugin(Item, Certs)
    register_stanza_plugin(Certs, PublishedCert, iterable=True)


def has_capsule(msg: Message) -> bool:
    """Whether ``msg`` carries a capsule of either wire format (v0 or v1)."""
    return any(child.tag in CAPSULE_TAGS for child in msg.xml)


CAPSULE_TAGS = frozenset({f"{{{ns.NAMESPACE}}}capsule", f"{{{ns.V1_NAMESPACE}}}capsule"})


def to_core(element: CapsuleElement) -> core.Capsule:
    """Read a ``<capsule/>`` into the core's dataclass; refuses anything malformed."""
    return parse_capsule(element.xml)


# the documented shape: each element's attributes and children (a <key> may repeat)
SHAPE: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "capsule": (frozenset(), ("header", "payload", "signature")),
    "header": (frozenset({"sender", "cert", "nid", "ts"}), ("key", "iv")),
    "key": (frozenset({"jid", "cert"}), ()),
    "iv": (frozenset(), ()),
    "payload": (frozenset(), ()),
    "signature": (frozenset(), ()),
}


def check_element_shape(xml: ET.Element) -> None:
    """Refuse a capsule with anything the format does not define: another attribute, child or
    namespace, text between elements, a missing or repeated part. The signature covers what
    :func:`parse_capsule` reads, so without this, material added beside it would ride along
    unnoticed under a valid signature."""
    prefix = f"{{{ns.NAMESPACE}}}"
    for node in xml.iter():
        name = node.tag[len(prefix):] if node.tag.startswith(prefix) else ""
        if name not in SHAPE:
            raise MalformedCapsule(f"capsule holds a foreign element <{node.tag}>")
        attributes, children = SHAPE[name]
        if set(node.attrib) != attributes:
            raise MalformedCapsule(f"<{name}> has attributes {sorted(node.attrib)}, "
                                   f"not {sorted(attributes)}")
        if node is not xml and (node.tail or "").strip():
            raise MalformedCapsule(f"text after <{name}>")
        if children and (node.text or "").strip():
            raise MalformedCapsule(f"text in <{name}>")
        tags = [child.tag[len(prefix):] for child in node]
        if name == "header":
            tags = [t for t in tags if t != "key"]
        if sorted(tags) != sorted(c for c in children if c != "key"):
            raise MalformedCapsule(f"<{name}> holds {tags or 'nothing'}, not {list(children)}")


def parse_capsule(xml: ET.Element) -> core.Capsule:
    """The same from plain ElementTree, for tools that read stored stanzas (the audit);
    the element must have exactly the documented shape (:func:`check_element_shape`)."""
    prefix = f"{{{ns.NAMESPACE}}}"
    header = xml.find(prefix + "header")
    if header is None:
        raise MalformedCapsule("capsule has no <header>")
    payload, signature = xml.find(prefix + "payload"), xml.find(prefix + "signature")
    if payload is None or signature is None:
        raise MalformedCapsule("capsule has no <payload> or <signature>")
    attrs = {}
    for attr in ("sender", "cert", "nid", "ts"):
        attrs[attr] = header.get(attr, "")
        if not attrs[attr]:
            raise MalformedCapsule(f"capsule header lacks '{attr}'")
    keys = []
    for key in header.findall(prefix + "key"):
        if not key.get("jid") or not key.get("cert"):
            raise MalformedCapsule("a <key> lacks jid or cert")
        keys.append(core.KeyEntry(key.get("jid", ""), key.get("cert", ""), _unb64(key.text, "key")))
    check_element_shape(xml)
    return core.Capsule(
        header=core.Header(
            sender=attrs["sender"], cert=attrs["cert"], nid=_unb64(attrs["nid"], "nid"),
            ts=attrs["ts"], keys=tuple(keys), iv=_unb64(header.findtext(prefix + "iv"), "iv"),
        ),
        payload=_unb64(payload.text, "payload"),
        signature=_unb64(signature.text, "signature"),
    )


def check_namespace_version(msg: Message) -> None:
    """A capsule of another version comes in another namespace: say so instead of ignoring it."""
    for child in msg.xml:
        tag = child.tag
        if tag.endswith("}capsule") and tag.startswith("{urn:capsule:") and (
                tag not in CAPSULE_TAGS):
            raise UnsupportedVersion(f"capsule version {tag[1:].split('}')[0]} is not supported")


def from_core(msg: Message, capsule: core.Capsule) -> None:
    """Put ``capsule`` into ``msg`` with the fallback body, the EME element and the store hint."""
    element = msg["capsule"]
    h = element["header"]
    h["sender"] = capsule.header.sender
    h["cert"] = capsule.header.cert
    h["nid"] = _b64(capsule.header.nid)
    h["ts"] = capsule.header.ts
    for entry in capsule.header.keys:
        key = Key()
        key["jid"], key["cert"], key["value"] = entry.jid, entry.cert, _b64(entry.wrapped)
        h.append(key)
    h["iv"] = _b64(capsule.header.iv)
    element["payload"] = _b64(capsule.payload)
    element["signature"] = _b64(capsule.signature)
    msg["body"] = FALLBACK_BODY
    msg["eme"]["namespace"] = ns.NAMESPACE
    msg["eme"]["name"] = "Capsule"
    msg.enable("store")
