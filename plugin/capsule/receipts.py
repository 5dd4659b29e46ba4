"""XEP-0184 delivery receipts: the contact's Capsule confirms a capsule once its app has it.

The server's XEP-0198 ack only says the server took a capsule; a server killed before storing
or routing it loses it silently, and so does a receiver killed between recording a capsule and
handing it over. So every one-to-one capsule asks for a receipt (``<request/>``, outside the
capsule), and the receiving plugin answers only once the capsule's replay entry and its
"handed to the app" mark are on disk (again for a resend of a capsule already handed; never
for one still on its way). A receipt is metadata only: the stanza id of the capsule, in
plaintext, as the id itself already is. Rooms get none (XEP-0184 §5).
"""

from __future__ import annotations

from slixmpp import BaseXMPP, Message
from slixmpp.plugins.xep_0184.stanza import Received, Request
from slixmpp.xmlstream import register_stanza_plugin

TYPES = frozenset({"chat", "normal", "headline"})  # not groupchat (XEP-0184 §5), not error


def register() -> None:
    register_stanza_plugin(Message, Request)
    register_stanza_plugin(Message, Received)


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


def answer(xmpp: BaseXMPP, msg: Message) -> None:
    """Confirm ``msg`` to the resource that sent it (the receipt names only its stanza id);
    kept out of the servers' archives (XEP-0334), stored offline if the sender is away."""
    receipt = xmpp.make_message(mto=msg["from"])
    receipt["receipt"] = msg["id"]
    receipt.enable("no-permanent-store")
    xmpp.send(receipt)
