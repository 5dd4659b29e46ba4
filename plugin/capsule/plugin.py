"""The slixmpp plugin: one ``register_plugin`` line gives a bot encapsulated messages.

Incoming capsules are taken out of the stream by an *in* filter (so handlers never see the
fallback body), verified and decrypted in arrival order per sender, and handed to the bot's
ordinary ``message`` handlers and to ``capsule_message``; failures become ``capsule_error``.
Outgoing messages with readable content (any child not on the allow-list of
:mod:`capsule.elements`) are held by an *out* filter and sealed for the addressee by a task.
Delivery rides on stream management (XEP-0198, a dependency): the outbox resends what the
server did not acknowledge and reports what it cannot deliver; the client reconnects.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import os
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from slixmpp import JID, BaseXMPP, ClientXMPP, Message
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins import BasePlugin, xep_0082
from slixmpp.xmlstream import StanzaBase

from capsule import algorithms as alg
from capsule import core, discovery, elements, enrollment, envelope
from capsule import stanza as st
from capsule.connection import Reconnect
from capsule.errors import (
    CapsuleError,
    CertificateWithdrawn,
    DuplicateCapsule,
    EnvelopeMismatch,
    MalformedCapsule,
    NoCertificate,
    NotAddressedToUs,
    PolicyViolation,
    ProfileError,
    RevocationUnknown,
    StorageError,
    UntrustedCertificate,
)
from capsule.inbound import HandledCount
from capsule.journal import GroupCommit
from capsule.locks import LockTable
from capsule.outbox import Outbox
from capsule.profile import PIN_ENV, Contact, Profile, now_iso
from capsule.replay import DEFAULT_MAX_AGE, DEFAULT_SKEW, Entry, TimeRules, Verdict
from capsule.trust import CertBundle, CertificateSource, TrustStore, VerifiedCert
from capsule.trust import Contact as VerifiedContact

log = logging.getLogger(__name__)
POLICIES = ("require", "prefer", "off")
FETCH_MEMORY = 1024  # claimed senders whose last look-up is remembered (rate limit, negative cache)
DELAY_SLACK = dt.timedelta(minutes=5)  # a server's <delay> may not predate the signed time by more
Origin = Literal["live", "carbon", "archive"]
COMPACT_AFTER = 512  # journal records (batches) before the profile is saved


@dataclass(frozen=True)
class CapsuleInfo:
    """Attached to every decrypted message as ``msg.capsule_info``."""

    sender: str
    sender_cert: VerifiedCert
    nid: str
    timestamp: str
    encrypted: bool = True


@dataclass(frozen=True)
class _Lookup:
    """What a claimed sender's last look-up gave, when, and whether it was a refresh."""

    when: float
    outcome: CertBundle | CapsuleError | None
    refresh: bool


@dataclass(frozen=True)
class PlaintextSent:
    """The payload of ``capsule_plaintext_sent``: a message left unencrypted, and why."""

    peer: str
    stanza_id: str
    reason: str  # "no-certificate" (policy prefer, a definite answer) or "policy-off"


@dataclass(frozen=True)
class CapsuleFailure:
    """The payload of ``capsule_error``: why, about which stanza; never any plaintext."""

    reason: str
    message: str
    stanza_id: str
    peer: str
    error: CapsuleError


def capsule_info(msg: Message) -> CapsuleInfo | None:
    """The verified-capsule facts of a message, or None if it did not arrive encrypted."""
    return getattr(msg, "capsule_info", None)


class XEP_Capsule(BasePlugin):
    """End-to-end encrypted, signed encapsulated messages (urn:capsule:0)."""

    name = "capsule"
    description = "Capsule: end-to-end encrypted, signed encapsulated messages"
    dependencies: ClassVar[set[str]] = {"xep_0030", "xep_0045", "xep_0060", "xep_0115", "xep_0163",
                                        "xep_0198", "xep_0280",
                                        "xep_0313", "xep_0334", "xep_0380"}
    default_config: ClassVar[dict[str, Any]] = {
        "profile": None,  # path of the profile file
        "pin": None,  # else "pin_file", else $CAPSULE_PIN
        "pin_file": None,
        "key_file": None,  # the profile's key file, if it is bound to one
        "policy": "prefer",  # require | prefer | off
        "allow_insecure": False,  # operate on a stream without TLS
        "publish": True,  # publish our certificates to PEP on session start
        "carbons": False,  # enable XEP-0280 and decrypt carbon copies for this resource
        "crl": None,  # path of the CA's CRL file, re-read when it changes
        "crl_refresh": 300,  # seconds between CRL refreshes (file and CA service)
        "crl_retry": 30,  # seconds before a failed fetch of an expired CRL is tried again
        "ca_service": None,  # JID of `capsule-ca serve` (default: the one stored at enrollment)
        "save_delay": 0.2,  # seconds to batch profile saves (pins, CRL); replay: journal
        "skew": DEFAULT_SKEW,  # seconds a capsule may be dated ahead of our clock
        "max_age": DEFAULT_MAX_AGE,  # seconds a capsule may wait (offline) for live delivery
        "storage_retry": 2.0,  # seconds between attempts to make state durable again
        "fetch_timeout": 10,
        "fetch_interval": 60,  # seconds: at most one look-up per claimed sender, answer reused
        "max_envelope_bytes": envelope.MAX_BYTES,
        "max_envelope_depth": envelope.MAX_DEPTH,
        "source": None,  # a CertificateSource; default: PEP
        "delivery_timeout": 120,  # seconds for the server to ack a capsule, else undelivered
        "outbox_limit": 2000,  # unacknowledged capsules kept for resending
        "reconnect": True,  # reconnect a lost session, back-off doubling up to reconnect_max
        "reconnect_max": 30,
        "endpoints": (),  # (host, port) of every node of a clustered server: reconnect to any
    }
    secure = False  # the stream has TLS (set by session_bind)

    # -- life cycle ------------------------------------------------------------
    def plugin_init(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"capsule policy must be one of {POLICIES}, not {self.policy!r}")
        if not self.profile:
            raise ProfileError("the capsule plugin needs a 'profile' path")
        self.store = Profile.load(self.profile, self._take_pin(), self.key_file)
        if self.xmpp.session_bind_event.is_set():  # session_bind ran first
            self._check_session(self.xmpp.boundjid)
        data = self.store.data
        data.replay.rules = TimeRules(int(self.skew), int(self.max_age))
        if not (data.signing_cert and data.encryption_cert and data.ca_root):
            raise ProfileError(f"{self.profile} has no certificates yet: import them with "
                               f"`capsule profile import-cert` or run `capsule enroll`")
        self.trust = TrustStore(data.ca_root.encode(), data.crl.encode() if data.crl else None)
        self.config["ca_service"] = self.ca_service or data.ca_service
        self.own_sign = self.trust.verify(data.signing_cert.encode(), data.jid, "sign")
        self.own_encrypt = self.trust.verify(data.encryption_cert.encode(), data.jid, "encrypt")
        self.certificates: CertificateSource = self.source or discovery.PepSource(
            self.xmpp, self.fetch_timeout)
        if self.ca_service and not self.source:
            self.certificates = enrollment.FirstFound(self.certificates,
                                                      enrollment.CaDirectorySource(
                                                          self.xmpp, self.ca_service,
                                                          self.fetch_timeout))
        # our former signing certificates: our own old capsules stay verifiable
        self._own_signers = {self.own_sign.fingerprint: self.own_sign}
        for pem in data.retired_sign:
            cert = x509.load_pem_x509_certificate(pem.encode())
            fp = core.cert_fingerprint(cert)
            self._own_signers[fp] = VerifiedCert(data.jid, "sign", cert, fp,
                                                 cast(rsa.RSAPublicKey, cert.public_key()))
        self._locks = LockTable()
        self._fetched: OrderedDict[str, _Lookup] = OrderedDict()
        self._tasks: set[asyncio.Future[None]] = set()
        self._cleared: set[int] = set()
        self._save_handle: asyncio.TimerHandle | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._commit = GroupCommit(self.store.append, self._journal_failed)
        self._storage_error: StorageError | None = None
        self.duplicates = 0  # resends and copies of accepted capsules, dropped quietly
        self._persist()  # take the profile lock, clear litter, start the journal
        self._crl_mtime = 0.0
        self._crl_task: asyncio.Task[None] | None = None
        self._crl_tried = -float("inf")  # loop time of the last fetch of an expired CRL
        st.register()
        enrollment.register()
        self.handled = HandledCount(self.xmpp)  # its "in" filter must come before ours
        self.xmpp.add_filter("in", self._filter_in)
        self.xmpp.add_filter("out", self._filter_out)
        for event, handler in self._events():
            self.xmpp.add_event_handler(event, handler)
        self.outbox = Outbox(self.xmpp, self.delivery_timeout, self.outbox_limit,
                             self._undelivered)
        self.reconnector = (Reconnect(self.xmpp, cap=self.reconnect_max,
                                      endpoints=self.endpoints)
                            if self.reconnect and isinstance(self.xmpp, ClientXMPP) else None)
        self.refresh_crl()
        if self.xmpp.sessionstarted:  # registered on a client already logged in
            self._spawn(self._session_start(None))

    def _events(self) -> list[tuple[str, Callable[..., Any]]]:
        return [("session_start", self._session_start), ("disconnected", self._disconnected),
                ("carbon_received", self._on_carbon), ("carbon_sent", self._on_carbon),
                ("pubsub_publish", self._on_pubsub)]

    def plugin_end(self) -> None:
        self.xmpp.del_filter("in", self._filter_in)
        self.xmpp.del_filter("out", self._filter_out)
        for event, handler in self._events():
            self.xmpp.del_event_handler(event, handler)
        if self._crl_task:
            self._crl_task.cancel()
        self.handled.close()
        self.outbox.close()
        if self.reconnector:
            self.reconnector.close()
        self._release()

    def session_bind(self, jid: JID) -> None:
        # also called before plugin_init when registered on a client already logged in
        transport = self.xmpp.transport
        self.secure = transport is not None and transport.get_extra_info("ssl_object") is not None
        if not self.secure and not self.allow_insecure:
            log.error("stream has no TLS: Capsule refuses to operate (allow_insecure is off)")
        if hasattr(self, "store"):
            self._check_session(jid)

    def _check_session(self, jid: JID) -> None:
        if JID(jid).bare != self.store.data.jid:
            raise ProfileError(f"profile is for {self.store.data.jid}, the session is {jid}")

    def _take_pin(self) -> str:
        """The PIN from config, a file or the environment; not kept once the profile is open."""
        pin = self.pin
        if pin is None and self.pin_file:
            try:
                pin = Path(self.pin_file).read_text().strip()
            except OSError as exc:
                raise ProfileError(f"cannot read the PIN file: {exc.strerror}") from None
        if pin is None:
            pin = os.environ.get(PIN_ENV)
        if not isinstance(pin, str) or not pin:
            raise ProfileError(f"no PIN: pass 'pin', 'pin_file' or set ${PIN_ENV}")
        self.config["pin"] = None
        return pin

    async def _session_start(self, _event: Any) -> None:
        if self._crl_task is None and (self.crl or self.ca_service):
            self._crl_task = asyncio.ensure_future(self._watch_crl())
        if self.ca_service:
            await self.refresh_crl_from_ca()
            self.xmpp.plugin["xep_0163"].add_interest(enrollment.CRL_NODE)
            self.xmpp.send_presence_subscription(pto=JID(self.ca_service))  # for CRL updates
        if self.carbons:
            await self.xmpp.plugin["xep_0280"].enable()
        if self.publish and self._usable():
            try:
                await self.publish_certificates()
            except (IqError, IqTimeout) as exc:
                log.warning("could not publish Capsule certificates: %s",
                            exc.iq["error"]["text"] or exc.iq["error"]["condition"])
                self.xmpp.event("capsule_publish_failed", exc)

    async def publish_certificates(self) -> None:
        data = self.store.data
        chain = {"sign": data.signing_cert, "encrypt": data.encryption_cert, "ca": data.ca_root}
        await discovery.publish(self.xmpp, {k: v for k, v in chain.items() if v})
        log.info("published Capsule certificates for %s", data.jid)
        self.xmpp.event("capsule_published", data.jid)

    def _usable(self) -> bool:
        return self.secure or bool(self.allow_insecure)

    # -- CRL -------------------------------------------------------------------
    def refresh_crl(self) -> None:
        """Re-read the CRL file if it changed (also done every ``crl_refresh`` seconds)."""
        if not self.crl:
            return
        try:
            stat = os.stat(self.crl)
            if stat.st_mtime == self._crl_mtime:
                return
            pem = Path(self.crl).read_bytes()
        except OSError as exc:
            log.warning("cannot read the CRL %s: %s", self.crl, exc.strerror)
            return
        self._install_crl(pem, self.crl)
        self._crl_mtime = stat.st_mtime

    async def refresh_crl_from_ca(self) -> None:
        """Fetch the CRL from the CA service (on start, every ``crl_refresh`` s, on updates)."""
        try:
            self._install_crl(await enrollment.fetch_crl(self.xmpp, self.ca_service),
                              self.ca_service)
        except CapsuleError as exc:
            log.warning("could not refresh the CRL from %s: %s", self.ca_service, exc)

    def _install_crl(self, pem: bytes, origin: str) -> None:
        try:
            if self.trust.update_crl(pem):
                self.store.data.crl = pem.decode()
                self._dirty()
                log.info("CRL updated from %s", origin)
        except UntrustedCertificate as exc:
            log.warning("ignoring CRL from %s: %s", origin, exc)

    def _on_pubsub(self, msg: Message) -> None:
        # read the XML directly: iterating msg['pubsub_event']['items'] here would reset the
        # iterator slixmpp's own event loop over the items is using
        crl = msg.xml.find(f".//{{{enrollment.NS}}}crl")
        if crl is None or msg["from"].bare != JID(self.ca_service or "").bare:
            return
        pem = (crl.text or "").strip().encode()
        if pem:
            self._install_crl(pem + b"\n", f"{self.ca_service} (PEP)")

    async def check_revocation(self) -> None:
        """Raise RevocationUnknown unless our CRL is fresh; an expired or missing one is first
        fetched again (file, CA service), at most every ``crl_retry`` seconds."""
        try:
            self.trust.check_crl()
            return
        except RevocationUnknown:
            pass
        async with self._locks.hold("crl"):
            self.refresh_crl()
            loop = asyncio.get_running_loop()
            if self.ca_service and loop.time() - self._crl_tried >= self.crl_retry:
                self._crl_tried = loop.time()
                await self.refresh_crl_from_ca()
        self.trust.check_crl()

    async def _watch_crl(self) -> None:
        while True:
            await asyncio.sleep(self.crl_refresh)
            self.refresh_crl()
            if self.ca_service:
                await self.refresh_crl_from_ca()

    # -- contacts --------------------------------------------------------------
    async def contact(self, jid: str, refresh: bool = False, claimed: bool = False
                      ) -> VerifiedContact:
        """A contact's verified certificates: pinned ones if still valid, else fetched anew.

        ``claimed``: the sender named by an incoming capsule, whose look-ups are rate-limited.
        A pinned contact that now publishes nothing is refused (CertificateWithdrawn), never
        treated as having no certificates. Refused (RevocationUnknown) while we cannot tell
        whether they are revoked.
        """
        await self.check_revocation()
        async with self._locks.hold("contact " + jid):
            pinned = self.store.data.contacts.get(jid)
            if pinned and not refresh:
                try:
                    return self.trust.verify_contact(
                        jid, CertBundle(pinned.sign.encode(), pinned.encrypt.encode()))
                except UntrustedCertificate as exc:
                    log.info("pinned certificates of %s no longer valid (%s); refetching",
                             jid, exc.reason)
            bundle = await (self._fetch_claimed(jid, refresh) if claimed
                            else self.certificates.fetch(jid))
            if bundle is None and pinned is not None:
                raise CertificateWithdrawn(f"{jid} was pinned but now publishes no certificates")
            if bundle is None:
                raise NoCertificate(f"{jid} has published no Capsule certificates")
            verified = self.trust.verify_contact(jid, bundle)
            new = Contact(bundle.sign.decode(), bundle.encrypt.decode(), now_iso())
            if pinned is None or (pinned.sign, pinned.encrypt) != (new.sign, new.encrypt):
                self.store.data.contacts[jid] = new
                self._dirty()
                if pinned is not None:
                    log.info("certificates of %s changed and validated", jid)
                    self.xmpp.event("capsule_cert_changed", {"jid": jid, "contact": verified})
            return verified

    async def _fetch_claimed(self, jid: str, refresh: bool) -> CertBundle | None:
        """Look up a claimed sender at most once per ``fetch_interval``, plus one refresh (a
        capsule naming a certificate we have not seen: a rotation); meanwhile the answer, or
        the failure, is reused, so a flood naming one sender costs at most two look-ups."""
        now = time.monotonic()
        last = self._fetched.get(jid)
        if (last is None or now - last.when >= self.fetch_interval
                or (refresh and not last.refresh)):
            try:
                outcome: CertBundle | CapsuleError | None = await self.certificates.fetch(jid)
            except CapsuleError as exc:
                outcome = exc
            last = _Lookup(now, outcome, refresh)
            self._fetched[jid] = last
            self._fetched.move_to_end(jid)
            while len(self._fetched) > FETCH_MEMORY:
                self._fetched.popitem(last=False)
        if isinstance(last.outcome, CapsuleError):
            raise type(last.outcome)(*last.outcome.args)
        return last.outcome

    # -- sending ---------------------------------------------------------------
    async def seal(self, msg: Message, recipients: Iterable[str], room: str | None = None
                   ) -> core.Capsule:
        """Seal the protected elements of ``msg`` for ``recipients`` (bare JIDs) and ourselves.

        For a group chat, ``room`` is named among the envelope's addressees (not given a key),
        so a capsule cannot be replayed into another room or conversation.
        """
        self._check_usable()
        me = self.store.data.jid
        bare = list(dict.fromkeys(JID(r).bare for r in recipients))
        if not bare:
            raise ValueError("no recipients")
        contacts = [await self.contact(jid) for jid in bare if jid != me]
        keys = [core.Recipient(c.jid, c.encrypt.fingerprint, c.encrypt.public_key)
                for c in contacts]
        keys.append(core.Recipient(me, self.own_encrypt.fingerprint, self.own_encrypt.public_key))
        content = elements.content(msg.xml)
        addressees = [*bare, room] if room else bare
        sealed_env = envelope.encode(content, me, addressees, core.utc_timestamp())
        return core.seal(sealed_env, sender=me, sender_cert=self.own_sign.fingerprint,
                         signing_key=self.store.data.signing_key, recipients=keys)

    @staticmethod
    def _wrap(msg: Message, capsule: core.Capsule) -> Message:
        for el in elements.content(msg.xml):
            msg.xml.remove(el)
        st.from_core(msg, capsule)
        return msg

    async def encrypt_message(self, msg: Message, recipients: Iterable[str] | None = None
                              ) -> Message:
        """Replace ``msg``'s body (and subject) by a capsule for ``recipients``; by default its
        addressee, or for a group chat message every occupant of the room."""
        if msg["type"] == "groupchat":
            room = msg["to"].bare
            return self._wrap(msg, await self.seal(msg, self.occupants(room), room=room))
        return self._wrap(msg, await self.seal(msg, recipients or [msg["to"].bare]))

    def occupants(self, room: str) -> list[str]:
        """The real bare JIDs in a joined room; refuses rooms that hide them (anonymous)."""
        muc = self.xmpp.plugin["xep_0045"]
        jids = []
        for nick in muc.get_roster(JID(room)):
            jid = muc.get_jid_property(JID(room), nick, "jid")
            if not jid:
                raise PolicyViolation(f"{room} hides who {nick} is: capsules need a "
                                      f"non-anonymous room")
            jids.append(JID(jid).bare)
        return jids

    def _real_sender(self, stanza: Message) -> str:
        """Who sent a stanza: the bare JID, or in a room the occupant's real JID."""
        if stanza["type"] != "groupchat":
            return str(stanza["from"].bare)
        room, nick = stanza["from"].bare, stanza["from"].resource
        jid = self.xmpp.plugin["xep_0045"].get_jid_property(JID(room), nick, "jid")
        if not jid:
            raise EnvelopeMismatch(f"cannot tell who {nick} in {room} is (anonymous room?)")
        return str(JID(jid).bare)

    async def send_groupchat(self, room: str | JID, body: str) -> str:
        """Send ``body`` to a joined non-anonymous room, sealed once for every occupant."""
        msg = self.xmpp.make_message(mto=JID(JID(room).bare), mbody=body, mtype="groupchat")
        msg["id"] = self.xmpp.new_id()
        self.outbox.send(await self.encrypt_message(msg))
        return str(msg["id"])

    async def send(self, to: str | JID | Iterable[str | JID], body: str,
                   mtype: Literal["chat", "normal"] = "chat") -> list[str]:
        """Send ``body`` encrypted to one JID or several (one capsule, one stanza each).

        Raises NoCertificate/UntrustedCertificate/PolicyViolation; nothing is sent then.
        Returns the stanza ids.
        """
        targets = [to] if isinstance(to, str | JID) else list(to)
        template = self.xmpp.make_message(mto=JID(targets[0]), mbody=body, mtype=mtype)
        capsule = await self.seal(template, [str(t) for t in targets])
        ids = []
        for target in targets:
            msg = self.xmpp.make_message(mto=JID(target), mtype=mtype)
            msg["id"] = self.xmpp.new_id()
            self.outbox.send(self._wrap(msg, capsule))
            ids.append(msg["id"])
        return ids

    def _filter_out(self, stanza: StanzaBase) -> StanzaBase | None:
        """Hold back every message with readable content; it is sealed and sent by a task.

        A synchronous filter: slixmpp runs async filters as a task per outgoing stanza, which
        would tax every stanza; only the messages to encrypt pay for a task here.
        """
        if (not isinstance(stanza, Message) or st.has_capsule(stanza)
                or not elements.readable(stanza.xml)):
            return stanza
        if id(stanza) in self._cleared:  # plaintext allowed by policy prefer, coming back
            self._cleared.discard(id(stanza))
            self._plaintext_sent(stanza, "no-certificate")
            return stanza
        if self.policy == "off":
            self._plaintext_sent(stanza, "policy-off")
            return stanza
        self._spawn(self._seal_and_send(stanza))
        return None

    def _plaintext_sent(self, stanza: Message, reason: str) -> None:
        log.info("message %s to %s sent in plaintext (%s)", stanza["id"], stanza["to"].bare,
                 reason)
        self.xmpp.event("capsule_plaintext_sent",
                        PlaintextSent(str(stanza["to"].bare), stanza["id"], reason))

    async def _seal_and_send(self, stanza: Message) -> None:
        to = stanza["to"].bare
        async with self._locks.hold("out " + to):  # keeps the order of messages to one contact
            try:
                await self.encrypt_message(stanza)
            except NoCertificate as exc:
                # only a definite "none published", never for a room (every occupant or nobody)
                if self.policy != "prefer" or stanza["type"] == "groupchat":
                    self._fail(exc, stanza, to)
                    return
                self._cleared.add(id(stanza))
            except CapsuleError as exc:
                self._fail(exc, stanza, to)  # refused: never fall back to plaintext
                return
            if st.has_capsule(stanza):
                self.outbox.send(stanza)
            else:
                self.xmpp.send(stanza)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_usable(self) -> None:
        if not self._usable():
            raise PolicyViolation("the stream is not TLS-protected; Capsule refuses to operate")

    # -- receiving -------------------------------------------------------------
    def _filter_in(self, stanza: StanzaBase) -> StanzaBase | None:
        if not isinstance(stanza, Message):
            return stanza
        peer = str(stanza["from"].bare)
        try:
            st.check_namespace_version(stanza)
        except CapsuleError as exc:
            self._fail(exc, stanza, peer)
            return None
        from_room = stanza["type"] == "groupchat" and not stanza["from"].resource
        if st.has_capsule(stanza) and stanza["type"] == "error":
            # a bounce: the app learns which message failed; capsule and fallback withheld
            stanza.xml.remove(stanza["capsule"].xml)
            elements.strip(stanza.xml)
            return stanza
        if st.has_capsule(stanza):
            if from_room:
                self._fail(EnvelopeMismatch(f"a capsule from the room {peer} itself"), stanza, peer)
            else:  # a room serialises all of its occupants
                self._spawn(self.handled.hold(stanza, self._receive(stanza, "in " + peer)))
            return None
        if self.policy != "require" or not elements.readable(stanza.xml):
            return stanza
        kind = stanza["type"] or "normal"
        self._fail(PolicyViolation(f"plaintext {kind} message from {peer} refused (policy "
                                   f"require)"), stanza, peer)
        if stanza["type"] == "error" or from_room:  # still routed: its content withheld
            elements.strip(stanza.xml)
            return stanza
        return None

    async def _receive(self, stanza: Message, key: str, origin: Origin = "live",
                       sent_carbon: bool = False) -> None:
        async with self._locks.hold(key):  # arrival order per sender, also while fetching
            try:
                msg, durable = await self._open(stanza, origin=origin)
            except DuplicateCapsule as exc:
                self.duplicates += 1
                log.debug("dropped a duplicate (stanza %s): %s", stanza["id"], exc)
                self.xmpp.event("capsule_duplicate", self._failure(exc, stanza,
                                                                   stanza["from"].bare))
                return
            except CapsuleError as exc:
                self._fail(exc, stanza, stanza["from"].bare)
                return
        try:  # outside the lock: the sender's next capsules join the same journal batch
            await durable
        except StorageError as exc:
            self._fail(exc, stanza, stanza["from"].bare)
            return
        if sent_carbon:  # what another resource of ours sent: not a message *to* the bot
            self.xmpp.event("capsule_carbon_sent", msg)
            return
        self.xmpp.event("capsule_message", msg)
        self.xmpp.event("message", msg)
        if msg["type"] == "groupchat":
            self.xmpp.event("groupchat_message", msg)

    def _on_carbon(self, wrapper: Message) -> None:
        if not self.carbons:  # not asked for: a server reflecting our own capsules, dropped
            return
        sent = wrapper.xml.find("{urn:xmpp:carbons:2}sent") is not None
        inner = wrapper["carbon_sent" if sent else "carbon_received"]
        if st.has_capsule(inner) and inner["type"] in ("chat", "normal", "headline"):
            peer = inner["to" if sent else "from"].bare
            self._spawn(self._receive(inner, "in " + peer, origin="carbon", sent_carbon=sent))

    async def open(self, stanza: Message, replay_check: bool = True, origin: Origin = "live"
                   ) -> Message:
        """Verify and decrypt a capsule stanza into a new Message (see CapsuleInfo).

        Cheap checks come first (shape, size, who sent it, whether it holds a key for us), so
        junk costs no look-up and no cryptography; then the signature with the sender's
        verified certificate; then our key is unwrapped, the envelope decrypted and its
        addressing checked, then the time rules and the replay state (DuplicateCapsule for the
        very capsule again). Our own capsules are accepted only as carbons, from the archive
        (``origin``) or echoed by a room, never reflected back live. With ``replay_check`` it
        returns only once the replay entry is on disk.
        """
        msg, durable = await self._open(stanza, replay_check, origin)
        await durable
        return msg

    async def _open(self, stanza: Message, replay_check: bool = True, origin: Origin = "live"
                    ) -> tuple[Message, asyncio.Future[None]]:
        """:meth:`open`, and a future done when its replay entry is durable."""
        self._check_usable()
        capsule = st.to_core(stanza["capsule"])
        core.check_shape(capsule)
        header = capsule.header
        if len(capsule.payload) > self.max_envelope_bytes + alg.TAG_BYTES:
            raise MalformedCapsule(f"capsule payload exceeds {self.max_envelope_bytes} bytes")
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
        if not any(k.jid == me and k.cert in keys for k in header.keys):
            raise NotAddressedToUs(f"the capsule from {sender} holds no key for {me}")
        room = stanza["from"].bare if stanza["type"] == "groupchat" else None
        if sender == me:
            if origin == "live" and room is None:  # a room echoes what we say; nobody else may
                raise EnvelopeMismatch("our own capsule came back from another entity "
                                       "(only carbons, the archive and the room return it)")
            signer = self._own_signers.get(header.cert, self.own_sign)
        else:
            signer = await self._signer(sender, header.cert)
        if signer.fingerprint != header.cert:
            raise UntrustedCertificate(f"capsule names a signing certificate {sender} "
                                       f"does not hold")
        core.verify(capsule, signer.public_key)
        plain = core.unseal(capsule, jid=me, certs=keys)
        env = envelope.decode(plain, self.max_envelope_bytes, self.max_envelope_depth)
        # in a room the stanza comes from room/nick and is addressed to us; the envelope names
        # the room, and the nick must belong to the signer
        envelope.check_addressing(env, header, real_sender, room or stanza["to"].bare, me, room)
        durable = self._remember(capsule) if replay_check else _done()
        msg = self.xmpp.make_message(mto=stanza["to"], mfrom=stanza["from"], mtype=stanza["type"])
        msg["id"] = stanza["id"]
        for el in stanza.xml:  # routing and metadata from outside, content only from inside
            if elements.passed(el) and self._entitled(el, stanza, room, header.ts):
                msg.xml.append(copy.deepcopy(el))
        for el in env.content:
            msg.xml.append(el)
        msg.capsule_info = CapsuleInfo(sender, signer, header.nid.hex(),  # type: ignore[attr-defined]
                                       header.ts)
        return msg, durable

    def _entitled(self, el: ET.Element, stanza: Message, room: str | None, signed: str) -> bool:
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
        when = dt.datetime.strptime(signed, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        latest = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=int(self.skew))
        return bool(when - DELAY_SLACK <= stamp <= latest)

    async def _signer(self, sender: str, cert_fp: str) -> VerifiedCert:
        contact = await self.contact(sender, claimed=True)
        if contact.sign.fingerprint != cert_fp:  # rotated? look again (rate-limited) first
            contact = await self.contact(sender, refresh=True, claimed=True)
        return contact.sign

    async def history(self, with_jid: str | None = None, limit: int = 100) -> list[Message]:
        """Our MAM archive, decrypted (our own key entry makes sent capsules readable too).

        Capsules that fail verification are reported as ``capsule_error`` and left out.
        Replay checks are skipped: history is read again on purpose.
        """
        iq = await self.xmpp.plugin["xep_0313"].retrieve(
            with_jid=JID(with_jid) if with_jid else None, rsm={"max": limit})
        out = []
        for result in iq["mam"]["results"]:
            inner = result["mam_result"]["forwarded"]["stanza"]
            if not st.has_capsule(inner):
                continue
            try:
                out.append(await self.open(inner, replay_check=False, origin="archive"))
            except CapsuleError as exc:
                self._fail(exc, inner, inner["from"].bare)
        return out

    # -- errors ----------------------------------------------------------------
    @staticmethod
    def _failure(exc: CapsuleError, stanza: StanzaBase | None, peer: str) -> CapsuleFailure:
        return CapsuleFailure(exc.reason, str(exc), stanza["id"] if stanza else "", peer, exc)

    def _fail(self, exc: CapsuleError, stanza: StanzaBase | None, peer: str) -> None:
        log.warning("capsule %s for stanza %s with %s: %s", exc.reason,
                    stanza["id"] if stanza else "-", peer or "-", exc)
        self.xmpp.event("capsule_error", self._failure(exc, stanza, peer))

    def _undelivered(self, exc: CapsuleError, stanza: StanzaBase, peer: str) -> None:
        self._fail(exc, stanza, peer)
        self.xmpp.event("capsule_undelivered", self._failure(exc, stanza, peer))

    # -- durable state -----------------------------------------------------------
    def _remember(self, capsule: core.Capsule) -> asyncio.Future[None]:
        """Judge a verified capsule; a NEW one's entry goes to the journal (the future)."""
        self._ensure_durable()
        h = capsule.header
        verdict, entry = self.store.remember(h.sender, h.nid, h.ts, capsule.signature,
                                             int(time.time()))
        if verdict is Verdict.DUPLICATE:
            raise DuplicateCapsule(f"capsule {h.nid.hex()[:8]}… from {h.sender} was already "
                                   f"accepted")
        journal = self.store.journal
        if journal is not None and journal.records >= COMPACT_AFTER:
            self._dirty()  # fold the journal into the profile soon
        return self._commit.submit(entry)

    def _ensure_durable(self) -> None:
        """Refuse (StorageError) while replay entries cannot be written; retry first."""
        if self._storage_error is None and self.store.journal is not None:
            return
        if not self._commit.busy:
            self._persist()
        if self._storage_error is not None:
            raise StorageError(f"capsules are refused until the replay state can be made "
                               f"durable again ({self._storage_error})")

    def _journal_failed(self, entries: list[Entry], exc: Exception) -> None:
        for entry in entries:
            self.store.data.replay.forget(entry)  # not delivered: a resend must be accepted
        self._storage_failed(StorageError(f"cannot write the replay journal: "
                                          f"{getattr(exc, 'strerror', None) or exc}"))

    def _storage_failed(self, exc: CapsuleError) -> None:
        first = self._storage_error is None
        self._storage_error = exc if isinstance(exc, StorageError) else StorageError(str(exc))
        if first:
            self._fail(self._storage_error, None, "")
        if self._retry_handle is None:
            self._retry_handle = self.xmpp.loop.call_later(self.storage_retry, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        if self._commit.busy:
            self._retry_handle = self.xmpp.loop.call_later(self.storage_retry, self._retry)
            return
        self._persist()

    def _persist(self) -> None:
        """Save now under the profile lock (compacting the journal); the outcome decides
        whether capsules are delivered. Call only while no journal write runs."""
        self._cancel_save()
        try:
            self.store.hold()
        except (StorageError, ProfileError) as exc:
            self._storage_failed(exc)
            return
        if self._storage_error is not None:
            log.warning("capsule state is durable again: capsules are delivered again")
            self.xmpp.event("capsule_storage_recovered", str(self.store.path))
        self._storage_error = None

    def _cancel_save(self) -> None:
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None

    def _dirty(self) -> None:
        if self._save_handle is None:
            self._save_handle = self.xmpp.loop.call_later(self.save_delay, self._spawn_save)

    def _spawn_save(self) -> None:
        self._save_handle = None
        self._spawn(self._save())

    async def _save(self) -> None:
        await self._commit.idle()
        self._persist()

    def _disconnected(self, _event: Any) -> None:
        if self._commit.busy:
            self._spawn(self._release_when_idle())
        else:
            self._release()  # at once: a restarted bot may open the profile next

    async def _release_when_idle(self) -> None:
        await self._commit.idle()
        self._release()

    def _release(self) -> None:
        """Save and give the profile lock up (taken again with the next capsule)."""
        self._cancel_save()
        try:
            self.store.release()
        except (StorageError, ProfileError) as exc:
            self._fail(exc if isinstance(exc, StorageError) else StorageError(str(exc)),
                       None, "")


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def attach(client: BaseXMPP, profile: str | Path, pin: str, **config: Any
           ) -> Callable[[float], Awaitable[None]]:
    """Register the capsule plugin on ``client`` (the one line of a bot, for scripts and tests).

    Returns ``published(timeout)``, which waits after the login until the certificates are on
    PEP, so that contacts can encrypt to this client.
    """
    import capsule

    client.register_plugin("capsule", {"profile": str(profile), "pin": pin, **config},
                           module=capsule)
    done = asyncio.Event()
    client.add_event_handler("capsule_published", lambda _jid: done.set())

    async def published(timeout: float) -> None:
        await asyncio.wait_for(done.wait(), timeout)

    return published
