"""Revocation: keep the CA's CRL fresh from a file, from the CA service and from its PEP pushes.

A CRL is installed only when our root signed it and it is newer than the one held; the profile
keeps it (saved with the next batch). While the CRL is missing or past nextUpdate every
look-up is refused (:meth:`Revocation.check`), after one more attempt to fetch it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from slixmpp import JID, BaseXMPP, Message

from capsule import enrollment
from capsule.errors import CapsuleError, RevocationUnknown, UntrustedCertificate
from capsule.locks import LockTable
from capsule.options import CapsuleOptions
from capsule.profile import Profile
from capsule.trust import TrustStore

log = logging.getLogger(__name__)
PUSH_EVENT = "capsule_crl"  # slixmpp raises capsule_crl_publish for items of the CRL node


class Revocation:
    """The CRL of our CA: read, fetched, pushed, checked."""

    def __init__(self, xmpp: BaseXMPP, options: CapsuleOptions, store: Profile,
                 trust: TrustStore, locks: LockTable, changed: Callable[[], None]) -> None:
        self.xmpp, self.options, self.store, self.trust = xmpp, options, store, trust
        self._locks, self._changed = locks, changed
        self._mtime = 0.0
        self._task: asyncio.Task[None] | None = None
        self._tried = -float("inf")  # loop time of the last fetch of an expired CRL
        xmpp.plugin["xep_0060"].map_node_event(enrollment.CRL_NODE, PUSH_EVENT)
        xmpp.add_event_handler(PUSH_EVENT + "_publish", self._on_push)

    def close(self) -> None:
        self.xmpp.del_event_handler(PUSH_EVENT + "_publish", self._on_push)
        if self._task:
            self._task.cancel()

    async def start(self) -> None:
        """On session start: watch the file and the CA, fetch now, ask for the CA's pushes."""
        ca = self.options.ca_service
        if self._task is None and (self.options.crl or ca):
            self._task = asyncio.ensure_future(self._watch())
        if ca:
            await self.refresh_from_ca()
            self.xmpp.plugin["xep_0163"].add_interest(enrollment.CRL_NODE)
            self.xmpp.send_presence_subscription(pto=JID(ca))  # for CRL updates

    def refresh_file(self) -> None:
        """Re-read the CRL file if it changed (also done every ``crl_refresh`` seconds)."""
        path = self.options.crl
        if not path:
            return
        try:
            stat = os.stat(path)
            if stat.st_mtime == self._mtime:
                return
            pem = Path(path).read_bytes()
        except OSError as exc:
            log.warning("cannot read the CRL %s: %s", path, exc.strerror)
            return
        self._install(pem, path)
        self._mtime = stat.st_mtime

    async def refresh_from_ca(self) -> None:
        """Fetch the CRL from the CA service (on start, every ``crl_refresh`` s, on updates)."""
        ca = self.options.ca_service
        if not ca:
            return
        try:
            self._install(await enrollment.fetch_crl(self.xmpp, ca), ca)
        except CapsuleError as exc:
            log.warning("could not refresh the CRL from %s: %s", ca, exc)

    async def check(self) -> None:
        """Raise RevocationUnknown unless our CRL is fresh; an expired or missing one is first
        fetched again (file, CA service), at most every ``crl_retry`` seconds."""
        try:
            self.trust.check_crl()
            return
        except RevocationUnknown:
            pass
        async with self._locks.hold("crl"):
            self.refresh_file()
            loop = asyncio.get_running_loop()
            if self.options.ca_service and loop.time() - self._tried >= self.options.crl_retry:
                self._tried = loop.time()
                await self.refresh_from_ca()
        self.trust.check_crl()

    def _install(self, pem: bytes, origin: str) -> None:
        try:
            if self.trust.update_crl(pem):
                self.store.data.crl = pem.decode()
                self._changed()
                log.info("CRL updated from %s", origin)
        except UntrustedCertificate as exc:
            log.warning("ignoring CRL from %s: %s", origin, exc)

    def _on_push(self, msg: Message) -> None:
        # read the XML directly: iterating msg['pubsub_event']['items'] here would reset the
        # iterator slixmpp's own loop over the items is using
        crl = msg.xml.find(f".//{{{enrollment.NS}}}crl")
        ca = self.options.ca_service
        if crl is None or not ca or msg["from"].bare != JID(ca).bare:
            return
        pem = (crl.text or "").strip().encode()
        if pem:
            self._install(pem + b"\n", f"{ca} (PEP)")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.crl_refresh)
            self.refresh_file()
            await self.refresh_from_ca()
