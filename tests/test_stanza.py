"""Stanza round trips in the manner of slixmpp's own SlixTest."""

from __future__ import annotations

import base64

import pytest
from slixmpp import Message
from slixmpp.test import SlixTest

from capsule import stanza as st
from capsule.errors import MalformedCapsule, UnsupportedVersion

from .helpers import CAPSULE, WIRE

B = base64.b64encode

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
