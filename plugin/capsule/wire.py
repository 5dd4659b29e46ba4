"""Either wire format: read, check and verify a ``<capsule/>`` of version 0 or 1.

One path for everything that handles capsules of both versions (the plugin, the audit): the
version is the element's namespace; any other ``urn:capsule:*`` is UnsupportedVersion.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from slixmpp import Message

from capsule import core, signatures, stanza_v1, v1
from capsule import namespaces as ns
from capsule.errors import MalformedCapsule, UnsupportedVersion
from capsule.stanza import from_core, parse_capsule

AnyCapsule = core.Capsule | v1.Capsule
TAGS = {f"{{{ns.NAMESPACE}}}capsule": 0, f"{{{ns.V1_NAMESPACE}}}capsule": 1}


def find(message: ET.Element) -> ET.Element | None:
    """The message's ``<capsule/>`` of a version we read (UnsupportedVersion for another)."""
    for child in message:
        if child.tag in TAGS:
            return child
        if child.tag.startswith("{urn:capsule:") and child.tag.endswith("}capsule"):
            raise UnsupportedVersion(f"capsule version {child.tag[1:].split('}')[0]} is not "
                                     f"supported")
    return None


def parse(xml: ET.Element) -> AnyCapsule:
    """Read a ``<capsule/>`` of either version, refusing anything malformed."""
    version = TAGS.get(xml.tag)
    if version is None:
        raise MalformedCapsule(f"not a capsule: {xml.tag}")
    return parse_capsule(xml) if version == 0 else stanza_v1.parse(xml)


def check_shape(capsule: AnyCapsule) -> None:
    if isinstance(capsule, v1.Capsule):
        v1.check_shape(capsule)
    else:
        core.check_shape(capsule)


def signed_bytes(capsule: AnyCapsule) -> bytes:
    """What the capsule's signature covers (its version's layout)."""
    if isinstance(capsule, v1.Capsule):
        return v1.signed_bytes(capsule)
    return core.signed_bytes(capsule)


def verify(capsule: AnyCapsule, signer: signatures.VerifyingKey) -> None:
    """Shape and signature, from the signer's certificate alone (the audit's whole check)."""
    if isinstance(capsule, v1.Capsule):
        v1.verify(capsule, signer)
    else:
        core.verify(capsule, signer)


def put(msg: Message, capsule: AnyCapsule) -> None:
    """Put ``capsule`` into ``msg`` with the fallback body, the EME element and the store hint."""
    if isinstance(capsule, v1.Capsule):
        stanza_v1.put(msg, capsule)
    else:
        from_core(msg, capsule)
