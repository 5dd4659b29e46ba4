"""XEP-0184 delivery receipts: the contact's Capsule confirms a capsule once its app has it.

The server's XEP-0198 ack only says the server took a capsule; a server killed before storing
or routing it loses it silently, and so does a receiver killed between recording a capsule and
handing it over. So every one-to-one capsule asks for a receipt (``<request/>``, outside the
capsule), and the receiving plugin answers only once the capsule's replay entry and its
"handed to the app" mark are on disk (again for a resend of a capsule already handed; never
for one still on its way). Any client on the contact's account may answer a XEP-0184 request,
so a receipt counts only with a ``<proof/>`` that only a reader of the capsule can make
(:func:`proof`: an HMAC, under a key derived from the capsule's message key, over the stanza id
and the addressee); the sender keeps that expected value, never the message key. A receipt is
metadata only: the stanza id of the capsule, in plaintext, as the id itself already is, and a
MAC that reveals nothing else. Rooms get none (XEP-0184 §5).
"""

from __future__ import annotations

import base64
import binascii
import hmac

from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from slixmpp import BaseXMPP, Message
from slixmpp.plugins.xep_0184.stanza import Received, Request
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from capsule import algorithms as alg
from capsule import namespaces as ns

TYPES = frozenset({"chat", "normal", "headline"})  # not groupchat (XEP-0184 §5), not error


class Proof(ElementBase):
    """``<proof xmlns='urn:capsule:receipt:0'>base64 HMAC</proof>`` beside ``<received/>``."""

    name = "proof"
    namespace = ns.RECEIPT_NAMESPACE
    plugin_attrib = "capsule_proof"
    interfaces = {"value"}

    def get_value(self) -> bytes:
        try:
            return base64.b64decode((self.xml.text or "").strip(), validate=True)
        except (binascii.Error, ValueError):
            return b""

    def set_value(self, value: bytes) -> None:
        self.xml.text = base64.b64encode(value).decode()


def register() -> None:
    register_stanza_plugin(Message, Request)
    register_stanza_plugin(Message, Received)
    register_stanza_plugin(Message, Proof)


def proof(message_key: bytes, stanza_id: str, addressee: str) -> bytes:
    """What only a reader of the capsule can say: HMAC-SHA256 under HKDF(message key, receipt
    label) over the length-prefixed stanza id and the addressee's bare JID. Pure; any wire
    format's message key."""
    mac_key = HKDF(alg.KEY_HASH, alg.MESSAGE_KEY_BYTES, None,
                   alg.RECEIPT_KEY_INFO).derive(message_key)
    mac = crypto_hmac.HMAC(mac_key, alg.KEY_HASH)
    for part in (stanza_id.encode(), addressee.encode()):
        mac.update(len(part).to_bytes(4, "big") + part)
    return mac.finalize()


def carry_key(msg: Message, message_key: bytes) -> None:
    """Give a sealed message its message key until the outbox turns it into the expected
    proof (:func:`take_key`); a capsule sealed without it can never be confirmed."""
    msg.capsule_message_key = message_key  # type: ignore[attr-defined]


def take_key(msg: Message) -> bytes | None:
    key: bytes | None = getattr(msg, "capsule_message_key", None)
    if key is not None:
        del msg.capsule_message_key  # type: ignore[attr-defined]
    return key


def proven(receipt: Message, expected: bytes | None) -> bool:
    """Whether a receipt carries the proof the sender expects (never without one)."""
    given = receipt.get_plugin("capsule_proof", check=True)
    return (expected is not None and isinstance(given, Proof)
            and hmac.compare_digest(given["value"], expected))


def confirmed(msg: Message) -> bool:
    """Whether a capsule of this type is confirmed by a receipt."""
    return msg["type"] in TYPES


def request(msg: Message) -> None:
    """Ask for a receipt (outside the capsule) if this message type gets one."""
    if confirmed(msg):
        msg["request_receipt"] = True


def wanted(msg: Message) -> bool:
    """Whether the sender of ``msg`` asked for a receipt we may give."""
    return bool(confirmed(msg) and msg["request_receipt"] and msg["id"] and not msg["receipt"])


def answer(xmpp: BaseXMPP, msg: Message, mac: bytes) -> None:
    """Confirm ``msg`` to the resource that sent it (its stanza id and the :func:`proof`);
    kept out of the servers' archives (XEP-0334), stored offline if the sender is away."""
    receipt = xmpp.make_message(mto=msg["from"])
    receipt["receipt"] = msg["id"]
    receipt["capsule_proof"]["value"] = mac
    receipt.enable("no-permanent-store")
    xmpp.send(receipt)
