"""The slixmpp plugin: one ``register_plugin`` line gives a bot encapsulated messages.

Incoming capsules are taken out of the stream by an *in* filter (so handlers never see the
fallback body), verified and decrypted in arrival order per sender, and handed to the bot's
ordinary ``message`` handlers and to ``capsule_message``; failures become ``capsule_error``.
Outgoing messages with readable content (any child not on the allow-list of
:mod:`capsule.elements`) are held by an *out* filter and sealed for the addressee by a task.
Delivery rides on stream management (XEP-0198, a dependency) and receipts (XEP-0184): the
outbox resends what the contact did not confirm and reports what it cannot deliver; the client
reconnects.

This class keeps the life cycle, the filters' registration and the public API; the work is
done by :mod:`~capsule.receiving`, :mod:`~capsule.sending`, :mod:`~capsule.contacts`,
:mod:`~capsule.revocation` and :mod:`~capsule.durability`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

from slixmpp import JID, BaseXMPP, ClientXMPP, ComponentXMPP, Message
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins import BasePlugin
from slixmpp.xmlstream import StanzaBase

from capsule import discovery, enrollment, events, fastxml, stanza_v1, wire
from capsule import namespaces as ns
from capsule import stanza as st
from capsule.connection import Reconnect
from capsule.contacts import ContactBook
from capsule.durability import DurableState
from capsule.errors import CapsuleError, PolicyViolation, ProfileError
from capsule.events import CapsuleFailure, CapsuleInfo, PlaintextSent, capsule_info
from capsule.inbound import HandledCount
from capsule.inflight import InFlight
from capsule.keyring import Keyring
from capsule.locks import LockTable
from capsule.options import CapsuleOptions, default_config
from capsule.outbox import Outbox
from capsule.pins import plugin_pin
from capsule.profile import Profile
from capsule.receiving import Origin, Receiver
from capsule.replay import TimeRules
from capsule.revocation import Revocation
from capsule.sending import Sender
from capsule.trust import CertificateSource, TrustStore, VerifiedContact

__all__ = ["CapsuleFailure", "CapsuleInfo", "PlaintextSent", "XEP_Capsule", "attach",
           "attach_async", "capsule_info"]
log = logging.getLogger(__name__)
PUBLISH_RETRY_S = (10.0, 300.0)  # a failed session-key publish: first retry, longest wait


class XEP_Capsule(BasePlugin):
    """End-to-end encrypted, signed encapsulated messages (urn:capsule:0 and :1)."""

    name = "capsule"
    description = "Capsule: end-to-end encrypted, signed encapsulated messages"
    dependencies: ClassVar[set[str]] = {"xep_0030", "xep_0045", "xep_0060", "xep_0115", "xep_0163",
                                        "xep_0198", "xep_0280",
                                        "xep_0313", "xep_0334", "xep_0380"}
    default_config: ClassVar[dict[str, Any]] = default_config()
    secure = False  # the stream has TLS (set by session_bind)
    _profile_jid: str | None = None  # whose profile is open (set by plugin_init)

    # -- life cycle ------------------------------------------------------------
    def __init__(self, xmpp: ClientXMPP | ComponentXMPP, config: dict[str, Any] | None = None):
        super().__init__(xmpp, config)
        if self.config.get("rooms") is False:  # no XEP-0045: its nine stanza handlers would
            # match every stanza of a bot that joins no room (README, "Options"); a value
            # that is not a bool is refused by plugin_init
            vars(self)["dependencies"] = self.dependencies - {"xep_0045"}

    def plugin_init(self) -> None:
        self.options = options = CapsuleOptions.from_config(self.config)
        unlocked, self.config["unlocked"] = self.config.get("unlocked"), None
        if unlocked is None:
            pin = plugin_pin(self.config.get("pin"), self.config.get("pin_file"))
            self.store = Profile.load(options.profile, pin, options.key_file)
        elif isinstance(unlocked, Profile) and unlocked.path == options.profile:
            self.store = unlocked  # opened by attach_async
        else:
            raise ProfileError("'unlocked' must be the Profile opened from 'profile'")
        self.config["pin"] = None
        data = self.store.data
        self._profile_jid = data.jid
        if self.xmpp.session_bind_event.is_set():  # session_bind ran first
            self._check_session(self.xmpp.boundjid)
        data.replay.rules = TimeRules(options.skew, options.max_age)
        if not (data.signing_cert and data.encryption_cert and data.ca_root):
            raise ProfileError(f"{options.profile} has no certificates yet: import them with "
                               f"`capsule profile import-cert` or run `capsule enroll`")
        self.trust = TrustStore(data.ca_root.encode(), data.crl.encode() if data.crl else None)
        if not options.ca_service and data.ca_service:
            self.options = options = dataclasses.replace(options, ca_service=data.ca_service)
        self.certificates: CertificateSource = options.source or discovery.PepSource(
            self.xmpp, options.fetch_timeout)
        if options.ca_service and not options.source:
            self.certificates = enrollment.FirstFound(self.certificates,
                                                      enrollment.CaDirectorySource(
                                                          self.xmpp, options.ca_service,
                                                          options.fetch_timeout))
        self._locks = LockTable()
        self._tasks: set[asyncio.Future[None]] = set()
        self.contacts = ContactBook(self.store, self.trust, self.certificates,
                                    options.fetch_interval, self._locks, self.check_revocation,
                                    self._dirty, self._cert_changed)
        self.own_sign, self.own_encrypt = self.contacts.own_sign, self.contacts.own_encrypt
        self.keyring = Keyring(self.xmpp, self.store, rotate=options.session_rotate,
                               retention=options.session_retention, skew=options.skew,
                               timeout=options.fetch_timeout, refresh=options.session_refresh)
        # on every start, saved by DurableState now: what is past retention destroyed and,
        # when we publish, the login's new session key (its rotation at session start then
        # finds it fresh: one profile save per login, not two)
        now = int(time.time())
        if options.publish:
            self.keyring.rotate(now, force=True)
        else:
            self.keyring.destroy(now)
        self.durable = DurableState(self.xmpp, self.store, options.save_delay,
                                    options.storage_retry, self._spawn)
        self.revocation = Revocation(self.xmpp, options, self.store, self.trust, self._locks,
                                     self._dirty)
        self._sessions_timer: asyncio.TimerHandle | None = None
        self._publish_retry = PUBLISH_RETRY_S[0]
        self._tend_later()
        self._republished = -float("inf")  # monotonic time of the last self-healing publish
        st.register()
        stanza_v1.register()
        fastxml.install()
        enrollment.register()
        self.handled = HandledCount(self.xmpp)  # its "in" filter must come before ours
        self.in_flight = InFlight(self._spawn)  # what the stream's end waits for
        self.receiver = Receiver(self.xmpp, options, self.store, self.contacts, self.durable,
                                 self._locks, self.handled, self.in_flight.spawn,
                                 self._check_usable, self._republish)
        self.outbox = Outbox(self.xmpp, options.delivery_timeout, options.outbox_limit,
                             self._undelivered, options.receipt_timeout)
        self.sender = Sender(self.xmpp, options, self.store, self.contacts, self.keyring,
                             self._locks, self.outbox, self.in_flight.spawn,
                             self._check_usable)
        self._filter_in = self.receiver.filter_in
        self._filter_out = self.sender.filter_out
        self.xmpp.add_filter("in", self._filter_in)
        self.xmpp.add_filter("out", self._filter_out)
        for event, handler in self._events():
            self.xmpp.add_event_handler(event, handler)
        # the app's disconnect() ends the stream once our work on it is written
        self._end_stream = self.xmpp.disconnect
        setattr(self.xmpp, "disconnect", self._disconnect)  # noqa: B010 - before Reconnect's
        self.reconnector = (Reconnect(self.xmpp, cap=options.reconnect_max,
                                      endpoints=options.endpoints)
                            if options.reconnect and isinstance(self.xmpp, ClientXMPP) else None)
        self.refresh_crl()
        if self.xmpp.sessionstarted:  # registered on a client already logged in
            self._spawn(self._session_start(None))

    def _events(self) -> list[tuple[str, Callable[..., Any]]]:
        return [("session_start", self._session_start), ("disconnected", self._disconnected),
                ("carbon_received", self.receiver.on_carbon),
                ("carbon_sent", self.receiver.on_carbon)]

    def plugin_end(self) -> None:
        self.xmpp.del_filter("in", self._filter_in)
        self.xmpp.del_filter("out", self._filter_out)
        for event, handler in self._events():
            self.xmpp.del_event_handler(event, handler)
        self.revocation.close()
        if self._sessions_timer:
            self._sessions_timer.cancel()
        self.handled.close()
        self.outbox.close()
        if self.reconnector:
            self.reconnector.close()  # gives disconnect() back to ours
        if self.xmpp.disconnect == self._disconnect:  # else a wrapper of the app's came after
            setattr(self.xmpp, "disconnect", self._end_stream)  # noqa: B010
        self.durable.release()

    def _disconnect(self, wait: float = 2.0, reason: str | None = None,
                    ignore_send_queue: bool = False) -> asyncio.Future[Any]:
        """slixmpp's ``disconnect()``, once the capsules taken from the stream are confirmed,
        the messages sent are sealed and all of it is written (at most ``wait`` s more).

        The server drops what comes after the stream's end: a receipt lost there leaves its
        sender waiting half its ``receipt_timeout`` for a resend, a capsule waits in the
        outbox for the next session (if the process lives on). slixmpp alone ends the
        stream at once when its send queue is empty, also while the last stanza taken from
        it is still in its filters (xep_0115's is a coroutine, run for every stanza): that
        stanza is written after the end. Past ``wait`` the end is written at once, as slixmpp
        does once its queue took that long; a stop whose stream is lost meanwhile ends no
        later one."""
        if wait is True:  # as slixmpp reads its documented ``disconnect(wait=True)``
            wait = 2.0
        if not wait or ignore_send_queue or self.xmpp.transport is None:
            return self._end_stream(wait, reason, ignore_send_queue)
        self.xmpp.disconnect_reason = reason  # as slixmpp: a stream lost meanwhile says why
        return asyncio.ensure_future(self._end_once_written(wait, reason))

    async def _end_once_written(self, wait: float, reason: str | None) -> None:
        loop = asyncio.get_running_loop()
        deadline, transport, written = loop.time() + wait, self.xmpp.transport, False
        with contextlib.suppress(TimeoutError):
            # each starts the other: a message taken from the queue is sealed by a task that
            # queues the capsule; a capsule is opened by a task whose last queues its receipt
            while not written:
                started = self.in_flight.started
                await self.in_flight.done(deadline - loop.time())
                await asyncio.wait_for(self.xmpp.waiting_queue.join(), deadline - loop.time())
                written = self.in_flight.started == started and not self.in_flight.busy
        if self.xmpp.transport is transport:
            await self._end_stream(wait if written else 0, reason, True)

    def session_bind(self, jid: JID) -> None:
        # also called before plugin_init when registered on a client already logged in
        transport = self.xmpp.transport
        self.secure = transport is not None and transport.get_extra_info("ssl_object") is not None
        if self._profile_jid is not None:
            self._check_session(jid)

    def _check_session(self, jid: JID) -> None:
        if JID(jid).bare != self._profile_jid:
            raise ProfileError(f"profile is for {self._profile_jid}, the session is {jid}")

    async def _session_start(self, _event: Any) -> None:
        if not self._usable():
            log.error("stream has no TLS: Capsule refuses to operate (allow_insecure is off)")
        await self.revocation.start()
        # round trips that need not wait for each other go out together: a login costs
        # two round trips in series, not three (four with carbons)
        carbons = (asyncio.ensure_future(self.xmpp.plugin["xep_0280"].enable())
                   if self.options.carbons else None)
        if not (self.options.publish and self._usable()):
            await self.destroy_sessions()
        else:
            held = asyncio.ensure_future(self._certificates_held())
            # session keys first: once capsule_published is raised, contacts can seal v1 to us
            await self.rotate_sessions(force=True)
            try:
                await self.publish_certificates(skip_if_held=await held)
            except (IqError, IqTimeout) as exc:
                log.warning("could not publish Capsule certificates: %s",
                            exc.iq["error"]["text"] or exc.iq["error"]["condition"])
                self.xmpp.event("capsule_publish_failed", exc)
        if carbons is not None:
            await carbons

    async def rotate_sessions(self, force: bool = False) -> None:
        """Destroy session keys past retention; a new one at login (``force``), when the
        newest is old or names a signing certificate we no longer use; publish ours merged
        with our other devices'. Failures are logged and reported with ``capsule_error``
        (storage: retried) or ``capsule_publish_failed``; contacts then seal v0 to us (or,
        under their ``forward_secrecy='require'``, nothing)."""
        await self.durable.idle()  # then no await until saved: no journal write in between
        now = int(time.time())
        try:
            if self.keyring.rotate(now, force):
                self.durable.persist()  # destroyed keys off the disk, a new one on it first
                if self.durable.error is not None:
                    return  # reported by persist(); the record stays unpublished
            if not await self.keyring.publish(now, self.own_sign):
                log.debug("our session keys are on PEP already")
        except CapsuleError as exc:  # e.g. our item could not be read: nothing to merge into
            events.fail(self.xmpp, exc, None, "")
            self._retry_publish()
            return
        except (IqError, IqTimeout) as exc:
            log.warning("could not publish session keys: %s", exc.iq["error"]["condition"])
            self.xmpp.event("capsule_publish_failed", exc)
            self._retry_publish()
            return
        self._publish_retry = PUBLISH_RETRY_S[0]
        self.xmpp.event("capsule_sessions_published", self.store.data.jid)

    def _retry_publish(self) -> None:
        """Contacts seal v0 to us while our session keys are not on PEP: try again soon, then
        less and less often (the hourly tending takes over at most PUBLISH_RETRY_S[1] on)."""
        self._tend_later(self._publish_retry)
        self._publish_retry = min(2 * self._publish_retry, PUBLISH_RETRY_S[1])

    def _republish(self) -> None:
        """Merge our record into our PEP item again (another device may have written over
        it), at most once per ``fetch_interval``."""
        now = time.monotonic()
        if (now - self._republished >= self.options.fetch_interval and self.options.publish
                and self._usable()):
            self._republished = now
            self._spawn(self.rotate_sessions())

    async def destroy_sessions(self) -> None:
        """Destroy session keys past retention and save; a failed save is reported and
        retried like every storage failure (``capsule_storage_recovered`` when it works)."""
        await self.durable.idle()  # then no await until saved
        if self.keyring.destroy(int(time.time())):
            self.durable.persist()

    def _tend_later(self, delay: float | None = None) -> None:
        if self._sessions_timer:
            self._sessions_timer.cancel()
        self._sessions_timer = self.xmpp.loop.call_later(
            min(self.options.session_rotate, 3600) if delay is None else delay,
            self._tend_sessions)

    def _tend_sessions(self) -> None:
        """Hourly, logged in or not, publishing or not: destroy what is past retention;
        rotate and publish too when we publish and are logged in."""
        self._tend_later()
        if self.options.publish and self.xmpp.sessionstarted and self._usable():
            self._spawn(self.rotate_sessions())
        else:
            self._spawn(self.destroy_sessions())

    def _disconnected(self, _event: Any) -> None:
        self.durable.disconnected()

    def _dirty(self) -> None:
        self.durable.dirty()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _usable(self) -> bool:
        return self.secure or self.options.allow_insecure

    def _check_usable(self) -> None:
        if not self._usable():
            raise PolicyViolation("the stream is not TLS-protected; Capsule refuses to operate")

    def _cert_changed(self, jid: str, contact: VerifiedContact) -> None:
        self.xmpp.event("capsule_cert_changed", {"jid": jid, "contact": contact})

    def _undelivered(self, exc: CapsuleError, stanza: StanzaBase, peer: str) -> None:
        events.fail(self.xmpp, exc, stanza, peer)
        self.xmpp.event("capsule_undelivered", events.failure(exc, stanza, peer))

    # -- public API ------------------------------------------------------------
    @property
    def duplicates(self) -> int:
        """Resends and copies of accepted capsules, dropped quietly."""
        return self.receiver.duplicates

    def _chain(self) -> dict[str, str]:
        data = self.store.data
        chain = {"sign": data.signing_cert, "encrypt": data.encryption_cert, "ca": data.ca_root}
        return {k: v for k, v in chain.items() if v}

    async def _certificates_held(self) -> bool:
        """Whether our certificates node holds exactly our chain with the options a publish
        sets; False when a read fails (then we publish, as if it did not)."""
        try:
            payloads, configured = await discovery.published_item(
                self.xmpp, ns.CERTS_NODE, self.options.fetch_timeout, "own certificates")
        except CapsuleError as exc:
            log.info("publishing our certificates: %s", exc)
            return False
        return configured and discovery.holds_chain(payloads, self._chain())

    async def publish_certificates(self, skip_if_held: bool = False) -> None:
        """Publish our chain (``skip_if_held``: the node was just read and holds it already),
        then raise ``capsule_published``."""
        data = self.store.data
        if not skip_if_held:
            await discovery.publish(self.xmpp, self._chain())
            log.info("published Capsule certificates for %s", data.jid)
        self.xmpp.event("capsule_published", data.jid)

    def refresh_crl(self) -> None:
        """Re-read the CRL file if it changed (also done every ``crl_refresh`` seconds)."""
        self.revocation.refresh_file()

    async def refresh_crl_from_ca(self) -> None:
        """Fetch the CRL from the CA service (on start, every ``crl_refresh`` s, on updates)."""
        await self.revocation.refresh_from_ca()

    async def check_revocation(self) -> None:
        """Raise RevocationUnknown unless our CRL is fresh (fetched again first if not)."""
        await self.revocation.check()

    async def contact(self, jid: str, refresh: bool = False, claimed: bool = False
                      ) -> VerifiedContact:
        """A contact's verified certificates (see :meth:`ContactBook.contact`)."""
        return await self.contacts.contact(jid, refresh, claimed)

    async def seal(self, msg: Message, recipients: Iterable[str], room: str | None = None
                   ) -> wire.AnyCapsule:
        """Seal the protected elements of ``msg`` for ``recipients`` (bare JIDs) and ourselves:
        v1 when all of them and we have valid session keys, else v0.

        For a group chat, ``room`` is named among the envelope's addressees (not given a key),
        so a capsule cannot be replayed into another room or conversation.
        """
        return await self.sender.seal(msg, recipients, room)

    async def encrypt_message(self, msg: Message, recipients: Iterable[str] | None = None
                              ) -> Message:
        """Replace ``msg``'s body (and subject) by a capsule for ``recipients``; by default its
        addressee, or for a group chat message every occupant of the room."""
        return await self.sender.encrypt_message(msg, recipients)

    def occupants(self, room: str) -> list[str]:
        """The real bare JIDs in a joined room; refuses rooms that hide them (anonymous)."""
        return self.sender.occupants(room)

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
        return await self.sender.send(targets, body, mtype)

    async def open(self, stanza: Message, replay_check: bool = True, origin: Origin = "live"
                   ) -> Message:
        """Verify and decrypt a capsule stanza into a new Message (see CapsuleInfo).

        Cheap checks come first (shape, size, who sent it, whether it holds a key for us), so
        junk costs no look-up and no cryptography; then the signature with the sender's
        verified certificate; then our key is unwrapped, the envelope decrypted and its
        addressing checked, then the time rules and the replay state (DuplicateCapsule for the
        very capsule again). Our own capsules are accepted only as carbons, from the archive
        (``origin``) or echoed by a room, never reflected back live. With ``replay_check`` it
        returns only once the replay entry is on disk, and records it as handed to the app.
        """
        msg, durable, _proof = await self.receiver.open_pending(stanza, replay_check, origin)
        await durable
        if replay_check:
            await self.durable.handed(msg)
        return msg

    def hold(self, msg: Message) -> asyncio.Future[None]:
        """Hold the confirmation of a capsule the app is still working on.

        A capsule counts as handed once its handlers were *called*; an ``async def`` handler
        has only been scheduled then. Call this in the handler, before its first ``await``,
        and set the future's result once the work is safe (``future.set_result(None)``): only
        then is the handed mark written and the receipt sent. An exception set on it (or a
        kill before) leaves the capsule unconfirmed: the sender's resend is delivered again.
        """
        return self.receiver.hold(msg)

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
                events.fail(self.xmpp, exc, inner, inner["from"].bare)
        return out


# attach_async's one thread: unlocks take turns anyway (capsule.profile_key), and in one thread
# the KDF's memory is reused from one malloc arena (a pool of threads kept 8 MiB per thread)
_UNLOCKING = ThreadPoolExecutor(1, thread_name_prefix="capsule-unlock")


def attach(client: BaseXMPP, profile: str | Path, pin: str, **config: Any
           ) -> Callable[[float], Awaitable[None]]:
    """Register the capsule plugin on ``client`` (the one line of a bot, for scripts and tests).

    Returns ``published(timeout)``, which waits after the login until the certificates are on
    PEP, so that contacts can encrypt to this client.
    """
    import capsule

    client.register_plugin("capsule", {"profile": str(profile), "pin": pin, **config},
                           module=capsule)
    return _published(client)


async def attach_async(client: BaseXMPP, profile: str | Path, pin: str, **config: Any
                       ) -> Callable[[float], Awaitable[None]]:
    """:func:`attach` for a process of many bots: the profile is opened (Argon2id, by default
    64 MiB and ≈ 0.3 s of CPU) in a worker thread, so the event loop keeps serving the bots
    already running meanwhile. Unlocks run one at a time per process; profiles made with
    ``--share-unlock-with`` and opened with one PIN share one (capsule.profile_key)."""
    import capsule

    path = Path(profile)
    unlocked = await asyncio.get_running_loop().run_in_executor(
        _UNLOCKING, Profile.load, path, pin, config.get("key_file"))
    client.register_plugin("capsule", {"profile": str(path), "unlocked": unlocked, **config},
                           module=capsule)
    return _published(client)


def _published(client: BaseXMPP) -> Callable[[float], Awaitable[None]]:
    done = asyncio.Event()
    client.add_event_handler("capsule_published", lambda _jid: done.set())

    async def published(timeout: float) -> None:
        await asyncio.wait_for(done.wait(), timeout)

    return published
