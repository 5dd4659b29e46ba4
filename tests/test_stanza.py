"""Stanza round trips in the manner of slixmpp's own SlixTest."""

from __future__ import annotations

import base64

import pytest
from slixmpp import Message
from slixmpp.test import SlixTest

from capsule import core
from capsule import stanza as st
from capsule.errors import MalformedCapsule, UnsupportedVersion

B = base64.b64encode
CAPSULE = core.Capsule(
    header=core.Header(
        sender="alice@example.org", cert="aa" * 32, nid=b"\x01" * 16, ts="2026-11-26T10:00:00Z",
        keys=(core.KeyEntry("alice@example.org", "cc" * 32, b"wrapped-a"),
              core.KeyEntry("bob@example.org", "bb" * 32, b"wrapped-b")),
        iv=b"\x02" * 12,
    ),
    payload=b"ciphertext-and-tag",
    signature=b"signature",
)

NID, IV = B(b"\x01" * 16).decode(), B(b"\x02" * 12).decode()
WIRE = f"""
<message to="bob@example.org" type="chat">
  <capsule xmlns="urn:capsule:0">
    <header sender="alice@example.org" cert="{'aa' * 32}" nid="{NID}"
            ts="2026-11-26T10:00:00Z">
      <key jid="alice@example.org" cert="{'cc' * 32}">{B(b'wrapped-a').decode()}</key>
      <key jid="bob@example.org" cert="{'bb' * 32}">{B(b'wrapped-b').decode()}</key>
      <iv>{IV}</iv>
    </header>
    <payload>{B(b'ciphertext-and-tag').decode()}</payload>
    <signature>{B(b'signature').decode()}</signature>
  </capsule>
  <body>{st.FALLBACK_BODY}</body>
  <encryption xmlns="urn:xmpp:eme:0" namespace="urn:capsule:0" name="Capsule"/>
  <store xmlns="urn:xmpp:hints"/>
</message>
"""


class TestCapsuleStanza(SlixTest):
    def setUp(self) -> None:
        st.register()

    def build(self) -> Message:
        msg = self.Message()
        msg["to"] = "bob@example.org"
        msg["type"] = "chat"
        st.from_core(msg, CAPSULE)
        return msg

    def test_wire_format(self) -> None:
        """The capsule, the fallback body, EME and the store hint, exactly as specified."""
        self.check(self.build(), WIRE, use_values=False)

    def test_round_trip_to_core(self) -> None:
        msg = self.Message(xml=self.parse_xml(WIRE))
        assert st.has_capsule(msg)
        assert st.to_core(msg["capsule"]) == CAPSULE
        assert msg["eme"]["namespace"] == "urn:capsule:0"

    def test_bad_base64_is_malformed(self) -> None:
        msg = self.Message(xml=self.parse_xml(WIRE.replace(B(b"signature").decode(), "@@not base64@@")))
        with pytest.raises(MalformedCapsule, match="<signature> is not valid base64"):
            st.to_core(msg["capsule"])

    def test_missing_parts_are_malformed(self) -> None:
        without_header = self.Message(xml=self.parse_xml(
            '<message><capsule xmlns="urn:capsule:0"><payload>AA==</payload></capsule></message>'))
        with pytest.raises(MalformedCapsule, match="no <header>"):
            st.to_core(without_header["capsule"])
        no_nid = self.Message(xml=self.parse_xml(WIRE.replace(' nid="', ' other="')))
        with pytest.raises(MalformedCapsule, match="lacks 'nid'"):
            st.to_core(no_nid["capsule"])

    def test_other_version_is_named(self) -> None:
        msg = self.Message(xml=self.parse_xml(
            '<message><capsule xmlns="urn:capsule:2"/><body>x</body></message>'))
        with pytest.raises(UnsupportedVersion, match="urn:capsule:2"):
            st.check_namespace_version(msg)
