"""Test vectors of wire format v1 (tests/data/v1-vectors.json), for a second implementation to
check itself against: fixed keys and randomness in, the exact bytes and XML out.

Regenerate (only when the format changes, with a README change): ``python -m tests.test_v1_vectors``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from capsule import sessions, stanza_v1, v1
from tests.helpers import VECTORS

ALICE, BOB = "alice@example.org", "bob@example.org"
INPUTS: dict[str, Any] = {
    "alice_signing_seed": "11" * 32, "alice_sign_cert": "a1" * 32,
    "alice_session_key": "22" * 32, "bob_session_key": "33" * 32, "ephemeral_key": "44" * 32,
    "message_key": "55" * 32, "iv": "66" * 12, "nid": "77" * 16,
    "ts": "2026-11-26T10:00:00Z", "session_created": 1795600800,
    "envelope": ("<envelope xmlns=\"urn:xmpp:sce:1\"><content><body xmlns=\"jabber:client\">"
                 "Hello Bob</body></content><rpad>AAAA</rpad><time stamp=\"2026-11-26T10:00:00Z\"/>"
                 "<to jid=\"bob@example.org\"/><from jid=\"alice@example.org\"/></envelope>"),
}


def compute(inputs: dict[str, Any]) -> dict[str, Any]:
    def x(name: str) -> x25519.X25519PrivateKey:
        return x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(inputs[name]))

    signer = ed25519.Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex(inputs["alice_signing_seed"]))
    alice, bob, eph = x("alice_session_key"), x("bob_session_key"), x("ephemeral_key")
    record = sessions.make_record(BOB, "b2" * 32, signer, bob, inputs["session_created"])
    capsule = v1.seal_with(
        inputs["envelope"].encode(), sender=ALICE, sender_cert=inputs["alice_sign_cert"],
        signing_key=signer, ts=inputs["ts"],
        recipients=[v1.Recipient(ALICE, sessions.public_bytes(alice)),
                    v1.Recipient(BOB, sessions.public_bytes(bob))],
        message_key=bytes.fromhex(inputs["message_key"]), iv=bytes.fromhex(inputs["iv"]),
        nid=bytes.fromhex(inputs["nid"]), ephemeral=eph)
    bob_pub = sessions.public_bytes(bob)
    shared = bob.exchange(x25519.X25519PublicKey.from_public_bytes(capsule.header.epk))
    return {
        "inputs": inputs,
        "alice_signing_public": signer.public_key().public_bytes_raw().hex(),
        "bob_session_public": bob_pub.hex(),
        "bob_sid": sessions.sid(bob_pub).hex(),
        "bob_session_record_signed_by": "alice's signing key, for the vector only; cert 'b2'*32",
        "bob_session_bytes": sessions.session_bytes(BOB, record).hex(),
        "bob_session_xml": ET.tostring(stanza_v1.build_sessions([record]), "unicode"),
        "epk": capsule.header.epk.hex(),
        "bob_shared_secret": shared.hex(),
        "bob_kek": v1.kek(shared, capsule.header.nid, capsule.header.epk, bob_pub, BOB).hex(),
        "wrapped": {k.jid: k.wrapped.hex() for k in capsule.header.keys},
        "header_bytes": v1.header_bytes(capsule.header).hex(),
        "signed_bytes": v1.signed_bytes(capsule).hex(),
        "payload": capsule.payload.hex(),
        "signature": capsule.signature.hex(),
        "capsule_xml": ET.tostring(stanza_v1.build(capsule), "unicode"),
    }


def test_vectors_are_reproduced_exactly() -> None:
    stored = json.loads(VECTORS.read_text())
    assert compute(stored["inputs"]) == stored


def test_the_stored_capsule_opens_as_bob_from_its_xml() -> None:
    stored = json.loads(VECTORS.read_text())
    capsule = stanza_v1.parse(ET.fromstring(stored["capsule_xml"]))
    signer = ed25519.Ed25519PublicKey.from_public_bytes(
        bytes.fromhex(stored["alice_signing_public"]))
    v1.verify(capsule, signer)
    bob = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(INPUTS["bob_session_key"]))
    plain = v1.unseal(capsule, jid=BOB, sessions={bytes.fromhex(stored["bob_sid"]): bob})
    assert plain.decode() == INPUTS["envelope"]


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(compute(INPUTS), indent=1) + "\n")
