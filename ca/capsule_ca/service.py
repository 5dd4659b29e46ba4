"""``capsule-ca serve``: the CA as an XMPP client account answering ``urn:capsule:enroll:0``.

Issues certificates only for the bare JID the server authenticated (the IQ's ``from``), looks
certificates up by JID, hands out the CRL and publishes it to its own PEP node after every
change (``capsule-ca revoke`` in another process included: the CRL file is watched). It renews
the CRL once half of its life has passed, so clients never hold an expired one while the service
runs. Requests are rate-limited per JID; every issuance is logged to ``DIR/issuance.log`` (who,
what, when, serial; never a secret). It reconnects after losing the server and answers malformed
requests with an error, then keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, cast

from slixmpp import ClientXMPP, Iq
from slixmpp.exceptions import XMPPError
from slixmpp.plugins.xep_0004.stanza import Form
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import CoroutineCallback
from slixmpp.xmlstream.matcher import StanzaPath

from capsule import enrollment
from capsule.connection import login
from capsule.jids import same_jid
from capsule.stanza import certs_by_usage
from capsule_ca.authority import Authority
from capsule_ca.errors import CAError, IdentityMismatch
from capsule_ca.profiles import Usage

log = logging.getLogger(__name__)


class RateLimiter:
    """At most ``limit`` requests per JID in any ``window`` seconds."""

    def __init__(self, limit: int, window: float):
        self.limit, self.window = limit, window
        self._hits: dict[str, deque[float]] = {}

    def allow(self, jid: str) -> bool:
        now = time.monotonic()
        hits = self._hits.setdefault(jid, deque())
        while hits and now - hits[0] > self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True


class EnrollmentService(ClientXMPP):
    def __init__(self, jid: str, password: str, authority: Authority, host: str, port: int,
                 tls_ca: str | Path, rate_limit: int = 5, rate_window: float = 3600,
                 crl_poll: float = 2.0):
        super().__init__(enrollment.service_jid(jid), password)
        self.authority = authority
        self.host, self.port, self.tls_ca = host, port, tls_ca
        self.limiter = RateLimiter(rate_limit, rate_window)
        self.crl_poll = crl_poll
        self._crl_mtime = 0.0
        self._running = True
        self._served = False  # reconnect only once a session started: a failed login just fails
        self._tasks: set[asyncio.Task[Any]] = set()
        enrollment.register()
        for plugin in ("xep_0030", "xep_0060", "xep_0163"):
            self.register_plugin(plugin)
        self.register_handler(CoroutineCallback(
            "capsule enroll", StanzaPath("iq@type=set/capsule_enroll"), self._enroll))
        self.register_handler(CoroutineCallback(
            "capsule lookup", StanzaPath("iq@type=get/capsule_lookup"), self._lookup))
        self.register_handler(CoroutineCallback(
            "capsule crl", StanzaPath("iq@type=get/capsule_crl"), self._crl))
        self.register_handler(CoroutineCallback(
            "capsule root", StanzaPath("iq@type=get/capsule_root"), self._root))
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("disconnected", self._lost)

    # -- life cycle --------------------------------------------------------------
    async def start(self) -> None:
        await login(self, self.host, self.port, self.tls_ca)

    async def stop(self) -> None:
        self._running = False
        for task in self._tasks:
            task.cancel()
        await self.disconnect(wait=1)

    async def _started(self, _event: Any) -> None:
        self._served = True
        self.send_presence()
        self._crl_mtime = 0.0  # publish on every (re)start
        if not any(t.get_name() == "crl-watch" for t in self._tasks):
            task = asyncio.create_task(self._watch_crl(), name="crl-watch")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _lost(self, _event: Any) -> None:
        reconnecting = any(t.get_name() == "reconnect" for t in self._tasks)
        if self._running and self._served and not reconnecting:  # one reconnect loop at a time
            task = asyncio.create_task(self._reconnect(), name="reconnect")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _reconnect(self) -> None:
        delay = 0.5
        while self._running:
            await asyncio.sleep(delay)
            try:
                await self.start()
                log.info("CA service reconnected")
                return
            except Exception as exc:
                log.info("CA service reconnect failed (%s); retrying", exc)
                delay = min(delay * 2, 10)

    async def _watch_crl(self) -> None:
        while self._running:
            try:
                if self.authority.crl_needs_renewal():
                    await asyncio.to_thread(self.authority.gencrl)
                    log.info("renewed the CRL (half of its life had passed)")
                mtime = self.authority.crl_path.stat().st_mtime
                if mtime != self._crl_mtime and self.is_connected():
                    await self.publish_crl()
                    self._crl_mtime = mtime
            except Exception as exc:
                log.warning("could not publish the CRL: %s", exc)
            await asyncio.sleep(self.crl_poll)

    async def publish_crl(self) -> None:
        crl = enrollment.Crl()
        crl["value"] = self.authority.crl_path.read_text()
        options = Form()
        options["type"] = "submit"
        options.add_field(var="FORM_TYPE", ftype="hidden",
                          value="http://jabber.org/protocol/pubsub#publish-options")
        options.add_field(var="pubsub#access_model", value="open")
        await self.plugin["xep_0060"].publish(None, enrollment.CRL_NODE, id="current",
                                              payload=crl, options=options, timeout=15)
        log.info("published the CRL to PEP node %s", enrollment.CRL_NODE)

    # -- requests ------------------------------------------------------------------
    async def _enroll(self, stanza: StanzaBase) -> None:
        iq = cast(Iq, stanza)
        requester = iq["from"].bare
        log.info("enrollment request from %s", requester)
        try:
            asked = iq["capsule_enroll"]["jid"]
            if asked and not same_jid(asked, requester):
                raise XMPPError("forbidden", f"{requester} may enroll only itself, not {asked}")
            csrs = certs_by_usage(iq["capsule_enroll"]["csrs"], enrollment.pem_text)
            if set(csrs) != {"sign", "encrypt"}:
                raise XMPPError("bad-request", "send one <csr usage='sign'/> and one usage='encrypt'")
            if not self.limiter.allow(requester):
                raise XMPPError("resource-constraint", "too many enrollments; try again later",
                                etype="wait")
            try:  # one CA transaction: both certificates (old ones revoked) or nothing
                records = await asyncio.to_thread(
                    self.authority.enroll, {Usage(u): pem for u, pem in csrs.items()},
                    requester, requester)
            except CAError as exc:
                self.authority.log(requester, f"refused enrollment: {exc}")
                if isinstance(exc, IdentityMismatch):
                    raise XMPPError("forbidden", str(exc)) from None
                raise XMPPError("bad-request", str(exc)) from None
            issued = {usage.value: record.pem() for usage, record in records.items()}
            issued["ca"] = self.authority.root_pem
        except XMPPError as exc:
            log.info("enrollment of %s refused: %s", requester, exc.text)
            reply = iq.reply(clear=False)
            reply.error()
            reply["error"]["condition"], reply["error"]["text"] = exc.condition, exc.text
            reply["error"]["type"] = exc.etype
            reply.send()
            return
        reply = iq.reply()
        for usage, pem in issued.items():
            cert = enrollment.IssuedCert()
            cert["usage"], cert["value"] = usage, pem.decode()
            reply["capsule_enroll"].append(cert)
        reply.send()

    async def _lookup(self, stanza: StanzaBase) -> None:
        iq = cast(Iq, stanza)
        jid = iq["capsule_lookup"]["jid"]
        try:
            records = {r.usage: r for r in self.authority.valid_for(jid)} if jid else {}
        except CAError:  # not a bare JID
            jid, records = "", {}
        if not jid or not {"sign", "encrypt"} <= set(records):
            reply = iq.reply(clear=False)
            reply.error()
            reply["error"]["condition"] = "item-not-found" if jid else "bad-request"
            reply["error"]["text"] = f"no valid certificates for {jid}" if jid else "lookup needs a jid"
            reply.send()
            return
        reply = iq.reply()
        reply["capsule_lookup"]["jid"] = jid
        for usage in ("sign", "encrypt"):
            cert = enrollment.IssuedCert()
            cert["usage"], cert["value"] = usage, records[usage].pem().decode()
            reply["capsule_lookup"].append(cert)
        reply.send()

    async def _crl(self, stanza: StanzaBase) -> None:
        iq = cast(Iq, stanza)
        reply = iq.reply()
        reply["capsule_crl"]["value"] = self.authority.crl_path.read_text()
        reply.send()

    async def _root(self, stanza: StanzaBase) -> None:
        iq = cast(Iq, stanza)
        reply = iq.reply()
        reply["capsule_root"]["value"] = self.authority.root_pem.decode()
        reply.send()
