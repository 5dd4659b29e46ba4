"""The receive path: capsules taken out of the stream, opened in arrival order per sender.

The *in* filter withholds every capsule (so handlers never see the fallback body) and, with
policy ``require``, every readable plaintext; a task per capsule opens it under the sender's
lock and hands the result to the app's ``message`` handlers and ``capsule_message``. Carbons
and the MAM archive go through the same :meth:`Receiver.open`.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Literal

from slixmpp import JID, BaseXMPP, Message
from slixmpp.plugins import xep_0082
from slixmpp.xmlstream import StanzaBase

from capsule import algorithms as alg
from capsule import core, elements, envelope, events, receipts, v1, wire
from capsule import stanza as st
from capsule.contacts import ContactBook
from capsule.durability import DurableState, Spawn, done
from capsule.errors import (
    CapsuleError,
    DuplicateCapsule,
    EnvelopeMismatch,
    MalformedCapsule,
    NoForwardSecrecy,
    NotAddressedToUs,
    PolicyViolation,
    StorageError,
    UntrustedCertificate,
)
from capsule.inbound import HandledCount
from capsule.locks import LockTable
from capsule.options import CapsuleOptions
from capsule.profile import Profile

log = logging.getLogger(__name__)
DELAY_SLACK = dt.timedelta(minutes=5)  # a server's <delay> may not predate the signed time by more
Origin = Literal["live", "carbon", "archive"]


class Receiver:
    """Opens capsules from the stream, carbons and the archive."""

    def __init__(self, xmpp: BaseXMPP, options: CapsuleOptions, store: Profile,
                 contacts: ContactBook, durable: DurableState, locks: LockTable,
                 handled: HandledCount, spawn: Spawn, check_usable: Callable[[], None],
                 sessions_missing: Callable[[], None]) -> None:
        self.xmpp, self.options, self.store = xmpp, options, store
        self.contacts, self.durable, self.locks, self.handled = contacts, durable, locks, handled
        self._spawn, self._check_usable = spawn, check_usable
        self._sessions_missing = sessions_missing  # a v1 capsule for us, but not our keys
        self.duplicates = 0  # resends and copies of accepted capsules, dropped quietly

    def filter_in(self, stanza: StanzaBase) -> StanzaBase | None:
        if not isinstance(stanza, Message):
            return stanza
        peer = str(stanza["from"].bare)
        try:
            st.check_namespace_version(stanza)
        except CapsuleError as exc:
            events.fail(self.xmpp, exc, stanza, peer)
            return None
        from_room = stanza["type"] == "groupchat" and not stanza["from"].resource
        if st.has_capsule(stanza) and stanza["type"] == "error":
            # a bounce: the app learns which message failed; capsule and fallback withheld
            element = wire.find(stanza.xml)
            if element is not None:
                stanza.xml.remove(element)
            elements.strip(stanza.xml)
            return stanza
        if st.has_capsule(stanza):
            if from_room:
                events.fail(self.xmpp, EnvelopeMismatch(f"a capsule from the room {peer} itself"),
                            stanza, peer)
            else:  # a room serialises all of its occupants
                self._spawn(self.handled.hold(stanza, self._receive(stanza, "in " + peer)))
            return None
        if self.options.policy != "require" or not elements.readable(stanza.xml):
            return stanza
        kind = stanza["type"] or "normal"
        events.fail(self.xmpp, PolicyViolation(f"plaintext {kind} message from {peer} refused "
                                               f"(policy require)"), stanza, peer)
        if stanza["type"] == "error" or from_room:  # still routed: its content withheld
            elements.strip(stanza.xml)
            return stanza
        return None

    def on_carbon(self, wrapper: Message) -> None:
        if not self.options.carbons:  # not asked for: a server reflecting our own capsules
            return
        sent = wrapper.xml.find("{urn:xmpp:carbons:2}sent") is not None
        inner = wrapper["carbon_sent" if sent else "carbon_received"]
        if st.has_capsule(inner) and inner["type"] in ("chat", "normal", "headline"):
            peer = inner["to" if sent else "from"].bare
            self._spawn(self._receive(inner, "in " + peer, origin="carbon", sent_carbon=sent))

    async def _receive(self, stanza: Message, key: str, origin: Origin = "live",
                       sent_carbon: bool = False) -> None:
        async with self.locks.hold(key):  # arrival order per sender, also while fetching
            try:
                msg, durable, proof = await self.open_pending(stanza, origin=origin)
            except DuplicateCapsule as exc:
                self.duplicates += 1
                log.debug("dropped a duplicate (stanza %s): %s", stanza["id"], exc)
                self.xmpp.event("capsule_duplicate",
                                events.failure(exc, stanza, stanza["from"].bare))
                if exc.handed and exc.proof:
                    receipts.answer(self.xmpp, stanza, exc.proof)  # the first may be lost
                return
            except CapsuleError as exc:
                events.fail(self.xmpp, exc, stanza, stanza["from"].bare)
                return
        try:  # outside the lock: the sender's next capsules join the same journal batch
            await durable
        except StorageError as exc:
            events.fail(self.xmpp, exc, stanza, stanza["from"].bare)
            return
        if sent_carbon:  # what another resource of ours sent: not a message *to* the bot
            self.xmpp.event("capsule_carbon_sent", msg)
        else:
            self.xmpp.event("capsule_message", msg)
            self.xmpp.event("message", msg)
            if msg["type"] == "groupchat":
                self.xmpp.event("groupchat_message", msg)
        # handled now (the server's XEP-0198 count may cover it: the app has it); its mark
        # and then its receipt follow, so the receipt says "on disk and with the app"
        self._spawn(self._confirm(msg, stanza, proof))

    async def _confirm(self, msg: Message, stanza: Message, proof: bytes) -> None:
        for held in getattr(msg, "capsule_holds", ()):
            try:
                await held
            except Exception as exc:  # the app could not take it: a copy comes again
                log.info("the app failed capsule %s (%s): not confirmed", stanza["id"],
                         type(exc).__name__)
                self.durable.orphan(msg)
                return
        if await self.durable.handed(msg) and proof:
            receipts.answer(self.xmpp, stanza, proof)

    def hold(self, msg: Message) -> asyncio.Future[None]:
        """:meth:`XEP_Capsule.hold`."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        msg.capsule_holds = [*getattr(msg, "capsule_holds", ()), future]  # type: ignore[attr-defined]
        return future

    async def open_pending(self, stanza: Message, replay_check: bool = True,
                           origin: Origin = "live"
                           ) -> tuple[Message, asyncio.Future[None], bytes]:
        """:meth:`XEP_Capsule.open`, a future done when its replay entry is durable, and the
        proof for its receipt (empty unless a live one-to-one capsule asks for one)."""
        self._check_usable()
        limit = self.options.max_envelope_bytes
        element = wire.find(stanza.xml)
        if element is None:
            raise MalformedCapsule("no capsule")
        capsule = wire.parse(element)
        wire.check_shape(capsule)
        if (self.options.forward_secrecy == "require" and isinstance(capsule, core.Capsule)
                and origin != "archive"):  # a carbon is a live copy: the server chose v0
            raise NoForwardSecrecy("a v0 capsule (no forward secrecy) refused: "
                                   "forward_secrecy is required")
        header = capsule.header
        if len(capsule.payload) > limit + alg.TAG_BYTES:
            raise MalformedCapsule(f"capsule payload exceeds {limit} bytes")
        if any(elements.name(el) in elements.WRAPPERS_BESIDE for el in stanza.xml):
            raise MalformedCapsule("a capsule beside a forwarding wrapper (carbon, archive "
                                   "result, forwarded, pubsub event)")
        me = self.store.data.jid
        sender = header.sender
        real_sender = self._real_sender(stanza)
        if real_sender != sender:
            raise EnvelopeMismatch(f"capsule signed by {sender} arrived from {real_sender}: "
                                   f"forwarded or spoofed")
        keys = self.store.decryption_keys()
        held = self.store.session_keys()
        if isinstance(capsule, v1.Capsule):
            if not any(k.jid == me and k.sid in held for k in capsule.header.keys):
                if any(k.jid == me for k in capsule.header.keys):
                    self._sessions_missing()  # sealed to our other devices only: on PEP?
                v1.unseal(capsule, jid=me, sessions={},  # raises the precise reason
                          destroyed=self.store.destroyed_sessions())
        elif not any(k.jid == me and k.cert in keys for k in capsule.header.keys):
            raise NotAddressedToUs(f"the capsule from {sender} holds no key for {me}")
        room = stanza["from"].bare if stanza["type"] == "groupchat" else None
        if sender == me and origin == "live" and room is None:
            # a room echoes what we say; nobody else may
            raise EnvelopeMismatch("our own capsule came back from another entity "
                                   "(only carbons, the archive and the room return it)")
        signer = await self.contacts.signer(sender, header.cert)
        if signer.fingerprint != header.cert:
            raise UntrustedCertificate(f"capsule names a signing certificate {sender} "
                                       f"does not hold")
        wire.verify(capsule, signer.public_key)
        plain, message_key = (v1.unseal_with_key(capsule, jid=me, sessions=held)
                              if isinstance(capsule, v1.Capsule)
                              else core.unseal_with_key(capsule, jid=me, certs=keys))
        env = envelope.decode(plain, limit, self.options.max_envelope_depth)
        # in a room the stanza comes from room/nick and is addressed to us; the envelope names
        # the room, and the nick must belong to the signer
        envelope.check_addressing(env, header, real_sender, room or stanza["to"].bare, me, room)
        proof = (receipts.proof(message_key, str(stanza["id"]), me)
                 if origin == "live" and receipts.wanted(stanza) else b"")
        try:
            durable, recovered = (self.durable.remember(capsule) if replay_check
                                  else (done(), False))
        except DuplicateCapsule as exc:
            exc.proof = proof
            raise
        msg = self.xmpp.make_message(mto=stanza["to"], mfrom=stanza["from"], mtype=stanza["type"])
        msg["id"] = stanza["id"]
        for el in stanza.xml:  # routing and metadata from outside, content only from inside
            if elements.passed(el) and self._entitled(el, room, header.ts):
                msg.xml.append(copy.deepcopy(el))
        for el in env.content:
            msg.xml.append(el)
        msg.capsule_info = events.CapsuleInfo(  # type: ignore[attr-defined]
            sender, signer, header.nid.hex(), header.ts, recovered=recovered,
            version=1 if isinstance(capsule, v1.Capsule) else 0)
        return msg, durable, proof

    def _entitled(self, el: ET.Element, room: str | None, signed: str) -> bool:
        """Whether an outer element may reach the app beside the decrypted content.

        Server metadata (<delay>, <stanza-id>) only when our server
        or the room added it (XEP-0359: servers strip stanza-ids in their own name), and a
        delay dated between the signed time and now (plus skew): servers pass on a sender's own
        <delay>, so this bound is all a receiver can check.
        """
        tag = elements.name(el)
        if tag not in elements.SERVER_METADATA:
            return True
        me = JID(self.store.data.jid)
        attr = JID(el.get("by" if tag[1] == "stanza-id" else "from", ""))
        allowed = {room} if room else {me.bare, me.domain}
        if attr.bare not in allowed or attr.resource:
            return False
        if tag[1] == "stanza-id":
            return True
        try:
            stamp = xep_0082.parse(el.get("stamp", ""))
        except ValueError:
            return False
        when = core.timestamp_datetime(signed)  # the header's, checked already
        latest = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.options.skew)
        return bool(when - DELAY_SLACK <= stamp <= latest)

    def _real_sender(self, stanza: Message) -> str:
        """Who sent a stanza: the bare JID, or in a room the occupant's real JID."""
        if stanza["type"] != "groupchat":
            return str(stanza["from"].bare)
        room, nick = stanza["from"].bare, stanza["from"].resource
        if not self.options.rooms:
            raise EnvelopeMismatch(f"cannot tell who {nick} in {room} is: group chat is off "
                                   f"for this bot (option rooms=False)")
        jid = self.xmpp.plugin["xep_0045"].get_jid_property(JID(room), nick, "jid")
        if not jid:
            raise EnvelopeMismatch(f"cannot tell who {nick} in {room} is (anonymous room?)")
        return str(JID(jid).bare)

