"""The v1 ``<capsule/>`` and ``<sessions/>`` elements: exact round trip, and everything the
README says a receiver refuses (non-canonical base64, foreign parts, text) is refused."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from capsule import stanza_v1, v1
from capsule.errors import CapsuleError, MalformedCapsule

from .helpers import VECTORS


def stored() -> str:
    return str(json.loads(VECTORS.read_text())["capsule_xml"])


def test_round_trip_is_byte_identical() -> None:
    xml = stored()
    assert ET.tostring(stanza_v1.build(stanza_v1.parse(ET.fromstring(xml))), "unicode") == xml


def _payload(xml: str) -> str:
    return xml.split("<ns0:payload>")[1].split("</ns0:payload>")[0]


@pytest.mark.parametrize("damage", [
    "wrapped-b64", "unpadded-b64", "urlsafe-b64", "spaced-b64", "noncanonical-bits",
    "extra-attribute", "extra-child", "foreign-child", "text-in-header", "text-after",
    "two-payloads", "no-iv", "upper-hex-cert", "key-attribute",
])
def test_hostile_shapes_are_malformed(damage: str) -> None:
    xml = stored()
    p = _payload(xml)
    sig = xml.split("<ns0:signature>")[1].split("</ns0:signature>")[0]
    assert sig.endswith("A==")  # an Ed25519 signature: 64 bytes, two pad characters
    bad = {
        "wrapped-b64": xml.replace(p, p[:20] + "\n" + p[20:]),
        "unpadded-b64": xml.replace(sig, sig.rstrip("=")),
        "urlsafe-b64": xml.replace(p, p.replace("+", "-").replace("/", "_"))
        if ("+" in p or "/" in p) else xml.replace(p, p[:-4] + "-_-_"),
        "spaced-b64": xml.replace(p, " " + p + " "),
        "noncanonical-bits": xml.replace(sig, sig[:-3] + "B=="),  # stray bits under the pad
        "extra-attribute": xml.replace("<ns0:header ", "<ns0:header extra='1' "),
        "extra-child": xml.replace("</ns0:header>", "<ns0:iv>AAAAAAAAAAAAAAAA</ns0:iv></ns0:header>"),
        "foreign-child": xml.replace("</ns0:header>", "<x xmlns='urn:other'/></ns0:header>"),
        "text-in-header": xml.replace("<ns0:iv>", "sneaky<ns0:iv>"),
        "text-after": xml.replace("</ns0:payload>", "</ns0:payload>sneaky"),
        "two-payloads": xml.replace("</ns0:capsule>", f"<ns0:payload>{p}</ns0:payload></ns0:capsule>"),
        "no-iv": xml.replace(xml[xml.index("<ns0:iv>"):xml.index("</ns0:iv>") + 9], ""),
        "upper-hex-cert": xml.replace("a1a1", "A1A1", 1),
        "key-attribute": xml.replace("<ns0:key ", "<ns0:key cert='00' ", 1),
    }[damage]
    assert bad != xml, damage
    with pytest.raises(MalformedCapsule):
        stanza_v1.parse(ET.fromstring(bad))


def test_session_records_round_trip_and_malformed_ones_are_dropped() -> None:
    xml = json.loads(VECTORS.read_text())["bob_session_xml"]
    records, dropped = stanza_v1.parse_sessions(ET.fromstring(xml))
    assert len(records) == 1 and dropped == 0
    assert ET.tostring(stanza_v1.build_sessions(records), "unicode") == xml
    bad = xml.replace("<ns0:session ", "<ns0:session extra='x' ").replace(
        "</ns0:sessions>", "<ns0:session pub='!!' cert='' created='' expires=''>AA==</ns0:session>"
        "</ns0:sessions>")
    assert stanza_v1.parse_sessions(ET.fromstring(bad)) == ([], 2)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0, max_value=10_000),
       char=st.sampled_from("<>&'\"=x/+A \n\x00"))
def test_one_changed_character_is_refused_or_fails_the_signature(position: int, char: str
                                                                 ) -> None:
    """Mangled anywhere, a v1 capsule parses to a Capsule error, never another exception, and
    never verifies unless the change left its meaning intact (an equivalent XML spelling)."""
    stored_json = json.loads(VECTORS.read_text())
    xml = stored_json["capsule_xml"]
    i = position % len(xml)
    mangled = xml[:i] + char + xml[i + 1:]
    signer = ed25519.Ed25519PublicKey.from_public_bytes(
        bytes.fromhex(stored_json["alice_signing_public"]))
    try:
        capsule = stanza_v1.parse(ET.fromstring(mangled))
        v1.verify(capsule, signer)
    except (ET.ParseError, CapsuleError):
        return
    assert capsule == stanza_v1.parse(ET.fromstring(xml))
