"""Contacts' certificates: pinned when first verified, looked up again only when needed.

Free of XMPP: certificates come from a :class:`~capsule.trust.CertificateSource`, are judged by
the :class:`~capsule.trust.TrustStore` and pinned in the profile; the plugin supplies the
revocation check and hears about pins to save and certificates that changed.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from cryptography import x509

from capsule.core import cert_fingerprint
from capsule.errors import (
    CapsuleError,
    CertificateWithdrawn,
    NoCertificate,
    ProfileError,
    UntrustedCertificate,
)
from capsule.locks import LockTable
from capsule.profile import Profile
from capsule.profile_data import PinnedContact, now_iso
from capsule.signatures import VerifyingKey
from capsule.trust import CertificateSource, CertPair, TrustStore, VerifiedCert, VerifiedContact

log = logging.getLogger(__name__)
FETCH_MEMORY = 1024  # claimed senders whose last look-up is remembered (rate limit, negative cache)


@dataclass(frozen=True)
class _Lookup:
    """What a claimed sender's last look-up gave, when, and whether it was a refresh."""

    when: float
    outcome: CertPair | CapsuleError | None
    refresh: bool


class ContactBook:
    """Verified certificates of contacts and of ourselves (current and retired signers)."""

    def __init__(self, store: Profile, trust: TrustStore, source: CertificateSource,
                 fetch_interval: float, locks: LockTable,
                 check_revocation: Callable[[], Awaitable[None]], pinned: Callable[[], None],
                 changed: Callable[[str, VerifiedContact], None]) -> None:
        data = store.data
        if not (data.signing_cert and data.encryption_cert and data.ca_root):
            raise ProfileError(f"{store.path} has no certificates yet")
        self.store, self.trust, self.source = store, trust, source
        self.fetch_interval = fetch_interval
        self._check_revocation, self._pinned, self._changed = check_revocation, pinned, changed
        self.own_sign = trust.verify(data.signing_cert.encode(), data.jid, "sign")
        self.own_encrypt = trust.verify(data.encryption_cert.encode(), data.jid, "encrypt")
        # our former signing certificates: our own old capsules stay verifiable
        self.own_signers = {self.own_sign.fingerprint: self.own_sign}
        for pem in data.retired_sign:
            cert = x509.load_pem_x509_certificate(pem.encode())
            fp = cert_fingerprint(cert)
            self.own_signers[fp] = VerifiedCert(data.jid, "sign", cert, fp,
                                                cast(VerifyingKey, cert.public_key()))
        self.locks = locks
        self.fetched: OrderedDict[str, _Lookup] = OrderedDict()

    async def contact(self, jid: str, refresh: bool = False, claimed: bool = False
                      ) -> VerifiedContact:
        """A contact's verified certificates: pinned ones if still valid, else fetched anew.

        ``claimed``: the sender named by an incoming capsule, whose look-ups are rate-limited.
        A pinned contact that now publishes nothing is refused (CertificateWithdrawn), never
        treated as having no certificates. Refused (RevocationUnknown) while we cannot tell
        whether they are revoked.
        """
        await self._check_revocation()
        async with self.locks.hold("contact " + jid):
            pinned = self.store.data.contacts.get(jid)
            if pinned and not refresh:
                try:
                    return self.trust.verify_contact(
                        jid, CertPair(pinned.sign.encode(), pinned.encrypt.encode()))
                except UntrustedCertificate as exc:
                    log.info("pinned certificates of %s no longer valid (%s); refetching",
                             jid, exc.reason)
            pair = await (self._fetch_claimed(jid, refresh) if claimed
                          else self.source.fetch(jid))
            if pair is None and pinned is not None:
                raise CertificateWithdrawn(f"{jid} was pinned but now publishes no certificates")
            if pair is None:
                raise NoCertificate(f"{jid} has published no Capsule certificates")
            verified = self.trust.verify_contact(jid, pair)
            new = PinnedContact(pair.sign.decode(), pair.encrypt.decode(), now_iso())
            if pinned is None or (pinned.sign, pinned.encrypt) != (new.sign, new.encrypt):
                self.store.data.contacts[jid] = new
                self._pinned()
                if pinned is not None:
                    log.info("certificates of %s changed and validated", jid)
                    self._changed(jid, verified)
            return verified

    async def signer(self, sender: str, cert_fp: str) -> VerifiedCert:
        """The certificate ``sender`` signed with, as a capsule names it: ours (current or
        retired) without a look-up, a contact's looked up again once if it rotated."""
        if sender == self.store.data.jid:
            return self.own_signers.get(cert_fp, self.own_sign)
        contact = await self.contact(sender, claimed=True)
        if contact.sign.fingerprint != cert_fp:  # rotated? look again (rate-limited) first
            contact = await self.contact(sender, refresh=True, claimed=True)
        return contact.sign

    async def _fetch_claimed(self, jid: str, refresh: bool) -> CertPair | None:
        """Look up a claimed sender at most once per ``fetch_interval``, plus one refresh (a
        capsule naming a certificate we have not seen: a rotation); meanwhile the answer, or
        the failure, is reused, so a flood naming one sender costs at most two look-ups."""
        now = time.monotonic()
        last = self.fetched.get(jid)
        if (last is None or now - last.when >= self.fetch_interval
                or (refresh and not last.refresh)):
            try:
                outcome: CertPair | CapsuleError | None = await self.source.fetch(jid)
            except CapsuleError as exc:
                outcome = exc
            last = _Lookup(now, outcome, refresh)
            self.fetched[jid] = last
            self.fetched.move_to_end(jid)
            while len(self.fetched) > FETCH_MEMORY:
                self.fetched.popitem(last=False)
        if isinstance(last.outcome, CapsuleError):
            raise type(last.outcome)(*last.outcome.args)
        return last.outcome
