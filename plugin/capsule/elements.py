"""Which children of a message stay outside the capsule; everything else is content.

Outside (the allow-list) are the elements servers and clients must read to route a message and
show its delivery state: routing, processing hints, receipts, chat states and markers, ids,
and the metadata servers add. Every other child is *content*: sealed into the envelope under
any policy, refused in plaintext under ``require``, and the only thing taken from a decrypted
envelope (see README, "Security properties").
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from functools import lru_cache

from capsule import namespaces as ns

CLIENT = "jabber:client"
FORWARD = "urn:xmpp:forward:0"
# (namespace, element name); None: every element of the namespace
OUTSIDE: frozenset[tuple[str, str | None]] = frozenset({
    (CLIENT, "error"),
    (ns.NAMESPACE, "capsule"), (ns.V1_NAMESPACE, "capsule"), ("urn:xmpp:eme:0", "encryption"),
    ("urn:xmpp:hints", None), ("urn:xmpp:receipts", None), (ns.RECEIPT_NAMESPACE, "proof"),
    ("http://jabber.org/protocol/chatstates", None), ("urn:xmpp:chat-markers:0", None),
    ("urn:xmpp:sid:0", None), ("urn:xmpp:delay", "delay"),
    ("http://jabber.org/protocol/address", "addresses"),
    ("http://jabber.org/protocol/pubsub#event", "event"),  # PEP notifications from the server
    ("urn:xmpp:carbons:2", None), ("urn:xmpp:mam:2", "result"),  # wrappers: see readable()
    ("urn:xmpp:mam:tmp", "archived"),  # ejabberd's archive id on a message fetched over MAM
})
# what may reach the app from outside a capsule (and survive strip()): no wrapper, no text
PASSED: frozenset[tuple[str, str | None]] = frozenset({
    (CLIENT, "error"), ("urn:xmpp:hints", None), ("urn:xmpp:receipts", None),
    ("http://jabber.org/protocol/chatstates", None), ("urn:xmpp:chat-markers:0", None),
    ("urn:xmpp:sid:0", None), ("urn:xmpp:delay", "delay"), ("urn:xmpp:carbons:2", "private"),
})
# never beside a capsule: they would put unsealed messages next to a sealed one
WRAPPERS_BESIDE: frozenset[tuple[str, str | None]] = frozenset({
    ("urn:xmpp:carbons:2", "received"), ("urn:xmpp:carbons:2", "sent"),
    ("urn:xmpp:mam:2", "result"), (FORWARD, "forwarded"),
    ("http://jabber.org/protocol/pubsub#event", "event"),
})
_MACHINERY = frozenset({(ns.NAMESPACE, "capsule"), (ns.V1_NAMESPACE, "capsule"),
                        ("urn:xmpp:eme:0", "encryption")})
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
    return outside_tag(element.tag)


@lru_cache(maxsize=1024)  # bounded: a hostile archive may use any number of tags
def outside_tag(tag: str) -> bool:
    """:func:`outside` by an element's tag alone, remembered per tag (the audit asks it for
    every element of every stored row)."""
    ns, _, local = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
    return (ns, None) in OUTSIDE or (ns, local) in OUTSIDE


def passed(element: ET.Element) -> bool:
    """Whether an element from outside a capsule may reach the app: routing, hints, receipts,
    chat states, server ids; none with text but the server's own (an error's or a delay's
    description, whose source plugin.py checks)."""
    ns, local = name(element)
    if (ns, None) not in PASSED and (ns, local) not in PASSED:
        return False
    return ((ns, local) in {(CLIENT, "error"), ("urn:xmpp:delay", "delay")}
            or not "".join(element.itertext()).strip())


def readable_element(element: ET.Element) -> bool:
    """Whether one element carries text, attributes or children (an empty <subject/> does not)."""
    return bool((element.text or "").strip() or len(element) or element.attrib)


def content(message: ET.Element) -> list[ET.Element]:
    """The children a capsule seals: all but the textless routing elements that pass outside
    (so a forwarded message, an address description or a pubsub item never goes out in clear
    beside a capsule) and the capsule machinery."""
    return [child for child in message if not passed(child) and name(child) not in _MACHINERY]


def readable(message: ET.Element) -> bool:
    """Whether a message carries anything a person could read outside a capsule.

    Beside a capsule its fallback body is not content; forwarded messages (carbons, archive
    results) count with what they forward.
    """
    sealed = any(name(child) in _MACHINERY and name(child)[1] == "capsule" for child in message)
    if len([child for child in message if name(child) in _WRAPPERS]) > 1:
        return True  # which one a client reads is up to it: ambiguous, so refused
    for child in message:
        if name(child) in _WRAPPERS:
            inner = forwarded(child)
            if inner is None or readable(inner):
                return True
        elif not outside(child) and readable_element(child) and not (
                sealed and name(child) == (CLIENT, "body")):
            return True
    return False


def forwarded(wrapper: ET.Element) -> ET.Element | None:
    """The message a wrapper forwards, judged as slixmpp reads it: its one <forwarded> direct
    child and that one's one stanza child; None when anything else is there (a decoy)."""
    if len(wrapper) != 1 or name(wrapper[0]) != (FORWARD, "forwarded"):
        return None
    stanzas = [c for c in wrapper[0] if name(c) != ("urn:xmpp:delay", "delay")]
    if len(stanzas) != 1 or name(stanzas[0]) != (CLIENT, "message"):
        return None
    return stanzas[0]


def strip(message: ET.Element) -> None:
    """Withhold the readable content of a message that must still be routed (an error bounce,
    the room's own messages): content removed, a subject kept empty for MUC bookkeeping."""
    for child in list(message):
        if passed(child):
            continue
        if name(child) == (CLIENT, "subject"):
            child.clear()
        else:
            message.remove(child)
