"""Which children of a message stay outside the capsule; everything else is content.

Outside (the allow-list) are the elements servers and clients must read to route a message and
show its delivery state: routing, processing hints, receipts, chat states and markers, ids,
and the metadata servers add. Every other child is *content*: sealed into the envelope under
any policy, refused in plaintext under ``require``, and the only thing taken from a decrypted
envelope (see README, "Security properties").
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from capsule import algorithms as alg

CLIENT = "jabber:client"
FORWARD = "urn:xmpp:forward:0"
# (namespace, element name); None: every element of the namespace
OUTSIDE: frozenset[tuple[str, str | None]] = frozenset({
    (CLIENT, "thread"), (CLIENT, "error"),
    (alg.NAMESPACE, "capsule"), ("urn:xmpp:eme:0", "encryption"),
    ("urn:xmpp:hints", None), ("urn:xmpp:receipts", None),
    ("http://jabber.org/protocol/chatstates", None), ("urn:xmpp:chat-markers:0", None),
    ("urn:xmpp:sid:0", None), ("urn:xmpp:delay", "delay"),
    ("http://jabber.org/protocol/address", "addresses"),
    ("http://jabber.org/protocol/pubsub#event", "event"),  # PEP notifications from the server
    ("urn:xmpp:carbons:2", None), ("urn:xmpp:mam:2", "result"),  # wrappers: see readable()
    ("urn:xmpp:mam:tmp", "archived"),  # ejabberd's archive id on a message fetched over MAM
})
SERVER_METADATA = frozenset({("urn:xmpp:delay", "delay"), ("urn:xmpp:sid:0", "stanza-id")})
_WRAPPERS = frozenset({("urn:xmpp:carbons:2", "received"), ("urn:xmpp:carbons:2", "sent"),
                       ("urn:xmpp:mam:2", "result")})
# only these content elements are read as what their name says; elsewhere they mean nothing
INTERPRETED = frozenset({"body", "subject", "thread"})


def name(element: ET.Element) -> tuple[str, str]:
    """(namespace, local name) of an element; namespace "" when it has none."""
    if element.tag.startswith("{"):
        ns, _, local = element.tag[1:].partition("}")
        return ns, local
    return "", element.tag


def outside(element: ET.Element) -> bool:
    ns, local = name(element)
    return (ns, None) in OUTSIDE or (ns, local) in OUTSIDE


def readable_element(element: ET.Element) -> bool:
    """Whether one element carries text, attributes or children (an empty <subject/> does not)."""
    return bool((element.text or "").strip() or len(element) or element.attrib)


def content(message: ET.Element) -> list[ET.Element]:
    """The children a capsule seals: all that are not on the outside list."""
    return [child for child in message if not outside(child)]


def readable(message: ET.Element) -> bool:
    """Whether a message carries anything a person could read outside a capsule.

    Beside a capsule its fallback body is not content; forwarded messages (carbons, archive
    results) count with what they forward.
    """
    sealed = message.find(f"{{{alg.NAMESPACE}}}capsule") is not None
    for child in message:
        if name(child) in _WRAPPERS:
            inner = child.find(f".//{{{FORWARD}}}forwarded/{{{CLIENT}}}message")
            if inner is not None and readable(inner):
                return True
        elif not outside(child) and readable_element(child) and not (
                sealed and name(child) == (CLIENT, "body")):
            return True
    return False


def strip(message: ET.Element) -> None:
    """Withhold the readable content of a message that must still be routed (an error bounce,
    the room's own messages): content removed, a subject kept empty for MUC bookkeeping."""
    for child in list(message):
        if outside(child):
            continue
        if name(child) == (CLIENT, "subject"):
            child.clear()
        else:
            message.remove(child)
