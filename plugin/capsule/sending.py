"""The send path: messages sealed for their addressees (or a room's occupants) and sent.

The *out* filter holds back every message with readable content; a task seals it under the
addressee's lock (so messages to one contact keep their order) and hands it to the outbox.
Policy ``prefer`` lets a message out in plaintext only on a definite "no certificates".
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from typing import Literal

from slixmpp import JID, BaseXMPP, Message
from slixmpp.xmlstream import StanzaBase

from capsule import core, elements, envelope, events, receipts, v1, wire
from capsule import stanza as st
from capsule.contacts import ContactBook
from capsule.durability import Spawn
from capsule.errors import (
    CapsuleError,
    NoCertificate,
    NoForwardSecrecy,
    PolicyViolation,
    ReusedId,
    SealingFailed,
)
from capsule.keyring import Keyring
from capsule.locks import LockTable
from capsule.options import CapsuleOptions
from capsule.outbox import Outbox
from capsule.profile import Profile

log = logging.getLogger(__name__)
# marks the very stanza policy prefer lets out in plaintext, until the out filter passes it
# (never its id(): a stanza dropped before it came back, e.g. from the send queue of a
# dead stream, would leave its address to the next message, which would then go out clear)
_CLEARED = "capsule_cleared_for_plaintext"


class Sender:
    """Seals and sends; the *out* filter."""

    def __init__(self, xmpp: BaseXMPP, options: CapsuleOptions, store: Profile,
                 contacts: ContactBook, keyring: Keyring, locks: LockTable, outbox: Outbox,
                 spawn: Spawn, check_usable: Callable[[], None]) -> None:
        self.xmpp, self.options, self.store = xmpp, options, store
        self.contacts, self.keyring, self.locks, self.outbox = contacts, keyring, locks, outbox
        self._spawn, self._check_usable = spawn, check_usable

    async def seal(self, msg: Message, recipients: Iterable[str], room: str | None = None
                   ) -> wire.AnyCapsule:
        """:meth:`XEP_Capsule.seal`."""
        return (await self._seal(elements.content(msg.xml), recipients, room))[0]

    async def _seal(self, content: list[ET.Element], recipients: Iterable[str],
                    room: str | None = None) -> tuple[wire.AnyCapsule, bytes]:
        """The capsule and its message key (for the proof its receipt must carry): v1 when
        every recipient and we have valid session keys, else v0 (NoForwardSecrecy under
        ``forward_secrecy='require'``)."""
        self._check_usable()
        if room is not None:
            self._check_rooms(room)
        me = self.store.data.jid
        bare = list(dict.fromkeys(JID(r).bare for r in recipients))
        if not bare:
            raise ValueError("no recipients")
        contacts = [await self.contacts.contact(jid) for jid in bare if jid != me]
        now = int(time.time())
        own_sign = self.contacts.own_sign
        mine = self.keyring.own(now)
        records = {c.jid: await self.keyring.peer(c.jid, c.sign, now)
                   for c in contacts} if mine else {}
        addressees = [*bare, room] if room else bare
        sealed_env = envelope.encode(content, me, addressees, core.utc_timestamp())
        key = core.new_message_key()
        if mine is not None and all(records.values()):
            devices = [mine, *await self.keyring.peer(me, own_sign, now)]  # our other ones
            return v1.seal(sealed_env, sender=me, sender_cert=own_sign.fingerprint,
                           signing_key=self.store.data.signing_key, recipients=[
                               v1.Recipient(jid, r.pub) for jid, found in
                               [*records.items(), (me, devices)] for r in found],
                           message_key=key), key
        if self.options.forward_secrecy == "require":
            lacking = [jid for jid, found in records.items() if not found]
            raise NoForwardSecrecy(f"no valid session keys for {', '.join(lacking) or me}: "
                                   f"forward secrecy is required")
        keys = [core.Recipient(c.jid, c.encrypt.fingerprint, c.encrypt.rsa_key)
                for c in contacts]
        own = self.contacts.own_encrypt
        keys.append(core.Recipient(me, own.fingerprint, own.rsa_key))
        return core.seal(sealed_env, sender=me, sender_cert=own_sign.fingerprint,
                         signing_key=self.store.data.signing_key, recipients=keys, key=key), key

    async def encrypt_message(self, msg: Message, recipients: Iterable[str] | None = None
                              ) -> Message:
        """:meth:`XEP_Capsule.encrypt_message`."""
        content = elements.content(msg.xml)
        if msg["type"] == "groupchat":
            room = msg["to"].bare
            return _wrap(msg, *await self._seal(content, self.occupants(room), room=room))
        return _wrap(msg, *await self._seal(content, recipients or [msg["to"].bare]))

    def _check_rooms(self, room: str) -> None:
        if not self.options.rooms:
            raise PolicyViolation(f"group chat is off for this bot (option rooms=False): "
                                  f"nothing sealed for {room}")

    def occupants(self, room: str) -> list[str]:
        """:meth:`XEP_Capsule.occupants`."""
        self._check_rooms(room)
        muc = self.xmpp.plugin["xep_0045"]
        jids = []
        for nick in muc.get_roster(JID(room)):
            jid = muc.get_jid_property(JID(room), nick, "jid")
            if not jid:
                raise PolicyViolation(f"{room} hides who {nick} is: capsules need a "
                                      f"non-anonymous room")
            jids.append(JID(jid).bare)
        return jids

    async def send(self, targets: list[str | JID], body: str,
                   mtype: Literal["chat", "normal"]) -> list[str]:
        """:meth:`XEP_Capsule.send`."""
        text = ET.Element(f"{{{elements.CLIENT}}}body")
        text.text = body
        capsule, key = await self._seal([text], [str(t) for t in targets])
        ids = []
        for target in targets:
            msg = self.xmpp.make_message(mto=JID(target), mtype=mtype)
            msg["id"] = self.xmpp.new_id()
            self.outbox.send(_wrap(msg, capsule, key))
            ids.append(msg["id"])
        return ids

    def filter_out(self, stanza: StanzaBase) -> StanzaBase | None:
        """Hold back every message with readable content; it is sealed and sent by a task.

        A synchronous filter: slixmpp runs async filters as a task per outgoing stanza, which
        would tax every stanza; only the messages to encrypt pay for a task here.
        """
        if (not isinstance(stanza, Message) or st.has_capsule(stanza)
                or not elements.readable(stanza.xml)):
            return stanza
        if getattr(stanza, _CLEARED, False):  # plaintext allowed by policy prefer, coming back
            delattr(stanza, _CLEARED)
            self._plaintext_sent(stanza, "no-certificate")
            return stanza
        if self.options.policy == "off":
            self._plaintext_sent(stanza, "policy-off")
            return stanza
        self._spawn(self._seal_and_send(stanza))
        return None

    def _plaintext_sent(self, stanza: Message, reason: str) -> None:
        log.info("message %s to %s sent in plaintext (%s)", stanza["id"], stanza["to"].bare,
                 reason)
        self.xmpp.event("capsule_plaintext_sent",
                        events.PlaintextSent(str(stanza["to"].bare), stanza["id"], reason))

    async def _seal_and_send(self, stanza: Message) -> None:
        to = stanza["to"].bare
        async with self.locks.hold("out " + to):  # keeps the order of messages to one contact
            try:
                await self.encrypt_message(stanza)
            except NoCertificate as exc:
                # only a definite "none published", never for a room (every occupant or nobody)
                if self.options.policy != "prefer" or stanza["type"] == "groupchat":
                    events.fail(self.xmpp, exc, stanza, to)
                    return
                setattr(stanza, _CLEARED, True)
            except CapsuleError as exc:
                events.fail(self.xmpp, exc, stanza, to)  # refused: never fall back to plaintext
                return
            except Exception as exc:  # a bug: unreported in a task, so refuse and report
                log.error("sealing message %s to %s failed: %s (no traceback: it may quote "
                          "content)", stanza["id"], to, type(exc).__name__)
                events.fail(self.xmpp, SealingFailed(f"sealing failed: {type(exc).__name__}"),
                            stanza, to)
                return
            if st.has_capsule(stanza):
                try:
                    self.outbox.send(stanza)
                except ReusedId as exc:
                    events.fail(self.xmpp, exc, stanza, to)
            else:
                self.xmpp.send(stanza)


def _wrap(msg: Message, capsule: wire.AnyCapsule, key: bytes) -> Message:
    for el in elements.content(msg.xml):
        msg.xml.remove(el)
    wire.put(msg, capsule)
    receipts.carry_key(msg, key)
    return msg
