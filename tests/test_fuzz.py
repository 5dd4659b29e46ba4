"""Fuzzing the parsers that take untrusted input: only Capsule's own errors may come out."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsule import envelope
from capsule import stanza as cst
from capsule.audit.findings import StoredRow
from capsule.audit.verdicts import Auditor, CertificateBundle
from capsule.errors import CapsuleError
from capsule.profile import FAST_KDF, Profile

from .helpers import WIRE

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
b64 = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)


@SETTINGS
@given(st.binary(max_size=400))
def test_envelope_decode_never_crashes(data: bytes) -> None:
    try:
        envelope.decode(data)
    except CapsuleError:
        pass


@SETTINGS
@given(sender=text, cert=text, nid=b64 | text, ts=text, iv=b64 | text, payload=b64 | text,
       signature=b64 | text, keys=st.lists(st.tuples(text, text, b64 | text), max_size=3))
def test_capsule_parsing_never_crashes(sender, cert, nid, ts, iv, payload, signature, keys) -> None:
    ns = "{urn:capsule:0}"
    root = ET.Element(ns + "capsule")
    header = ET.SubElement(root, ns + "header", sender=sender, cert=cert, nid=nid, ts=ts)
    for jid, fp, wrapped in keys:
        ET.SubElement(header, ns + "key", jid=jid, cert=fp).text = wrapped
    ET.SubElement(header, ns + "iv").text = iv
    ET.SubElement(root, ns + "payload").text = payload
    ET.SubElement(root, ns + "signature").text = signature
    try:
        from capsule import core

        core.check_shape(cst.parse_capsule(root))
    except CapsuleError:
        pass


@SETTINGS
@given(position=st.integers(min_value=0, max_value=len(WIRE) - 1),
       char=st.sampled_from("<>&'\"=x/ \x00"))
def test_audit_survives_mangled_stored_stanzas(authority, position: int, char: str) -> None:
    mangled = WIRE[:position] + char + WIRE[position + 1:]
    auditor = Auditor(authority.root_pem, CertificateBundle())
    finding = auditor.examine(StoredRow("fuzz", "1", "bob@example.org", None, mangled))
    assert finding.verdict in ("malformed", "unverified", "other", "sender-mismatch", "plaintext")


@pytest.fixture(scope="module")
def profile_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz-profile") / "p.capsule"
    Profile.create(path, "fuzz@capsule.test", "135790", kdf=FAST_KDF, short_pin=True)
    return path.read_bytes()


@SETTINGS
@given(position=st.integers(min_value=0, max_value=1 << 16), value=st.integers(0, 255))
def test_damaged_profile_is_a_clear_error(profile_bytes: bytes, tmp_path_factory,
                                          position: int, value: int) -> None:
    raw = bytearray(profile_bytes)
    index = position % len(raw)
    if raw[index] == value:
        return
    raw[index] = value
    path = tmp_path_factory.mktemp("fuzz") / "p.capsule"
    path.write_bytes(bytes(raw))
    with pytest.raises(CapsuleError):  # any single changed byte is detected
        Profile.load(path, "135790")
