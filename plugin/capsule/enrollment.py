"""The enrollment protocol ``urn:capsule:enroll:0`` (the CA as an XMPP service), client side.

- enroll (iq set): ``<enroll><csr usage='sign'>PEM</csr><csr usage='encrypt'>PEM</csr></enroll>``
  answered by ``<enroll><cert usage='sign'>…</cert><cert usage='encrypt'>…</cert>
  <cert usage='ca'>…</cert></enroll>``; issued only for the bare JID the server authenticated.
- lookup (iq get): ``<lookup jid='bob@example.org'/>`` answered with bob's valid certificates.
- crl (iq get): ``<crl/>`` answered by ``<crl>PEM</crl>``.
- root (iq get): ``<root/>`` answered by ``<root>PEM</root>``, the CA root; the client checks it
  (trusted root or TOFU) before it sends CSRs, because an enrollment revokes the old certificates.
Errors: bad-request (malformed), forbidden (another JID), resource-constraint (rate limit),
item-not-found (no certificates), internal-server-error; each with a ``<text/>``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from cryptography import x509
from slixmpp import JID, BaseXMPP, Iq
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0060.stanza import EventItem, Item
from slixmpp.plugins.xep_0199.stanza import Ping
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from capsule import discovery
from capsule.core import pem_fingerprint
from capsule.errors import CapsuleError, ProfileError
from capsule.profile import Profile
from capsule.stanza import TextValue, certs_by_usage
from capsule.trust import CertificateSource, CertPair, TrustStore

NS = "urn:capsule:enroll:0"
CRL_NODE = "urn:capsule:crl:0"
RESOURCE = "capsule-ca"  # IQs to a bare JID are answered by the server, so the CA has a resource
# what a server answers for a full JID with no session behind it (RFC 6121 8.5.3.2.2)
OFFLINE = {"service-unavailable", "recipient-unavailable"}


def service_jid(ca: str) -> JID:
    """The CA service's full JID: ``ca@example.org`` means ``ca@example.org/capsule-ca``."""
    jid = JID(ca)
    return jid if jid.resource else JID(f"{jid.bare}/{RESOURCE}")
log = logging.getLogger(__name__)


class EnrollmentError(CapsuleError):
    """The CA service refused, is offline or did not answer; ``condition`` tells which (the
    XMPP error condition, "offline" or "timeout")."""

    reason = "enrollment"

    def __init__(self, message: str, condition: str = "") -> None:
        super().__init__(message)
        self.condition = condition


class Csr(TextValue):
    name = "csr"
    namespace = NS
    plugin_attrib = "csr"
    plugin_multi_attrib = "csrs"
    interfaces = {"usage", "value"}


class IssuedCert(TextValue):
    name = "cert"
    namespace = NS
    plugin_attrib = "cert"
    plugin_multi_attrib = "certs"
    interfaces = {"usage", "value"}


class Enroll(ElementBase):
    name = "enroll"
    namespace = NS
    plugin_attrib = "capsule_enroll"
    interfaces = {"jid"}


class Lookup(ElementBase):
    name = "lookup"
    namespace = NS
    plugin_attrib = "capsule_lookup"
    interfaces = {"jid"}


class Crl(TextValue):
    name = "crl"
    namespace = NS
    plugin_attrib = "capsule_crl"
    interfaces = {"value"}


class Root(TextValue):
    name = "root"
    namespace = NS
    plugin_attrib = "capsule_root"
    interfaces = {"value"}


def register() -> None:
    register_stanza_plugin(Iq, Enroll)
    register_stanza_plugin(Iq, Lookup)
    register_stanza_plugin(Iq, Crl)
    register_stanza_plugin(Iq, Root)
    register_stanza_plugin(Iq, Ping)
    register_stanza_plugin(Enroll, Csr, iterable=True)
    register_stanza_plugin(Enroll, IssuedCert, iterable=True)
    register_stanza_plugin(Lookup, IssuedCert, iterable=True)
    register_stanza_plugin(EventItem, Crl)
    register_stanza_plugin(Item, Crl)


def pem_text(text: str) -> bytes:
    """A certificate or CSR as this protocol carries it (PEM text) as PEM bytes."""
    return text.strip().encode() + b"\n"


def pems(element: ElementBase) -> dict[str, bytes]:
    """{usage: PEM} of the <cert/> children."""
    return certs_by_usage(element["certs"], pem_text)


async def _ask(xmpp: BaseXMPP, iq: Iq, timeout: int) -> Iq:
    """Send ``iq`` to the CA service; fail as soon as the service is seen offline."""
    request = asyncio.ensure_future(iq.send(timeout=timeout))
    watch = asyncio.ensure_future(_while_online(xmpp, iq["to"]))
    try:
        await asyncio.wait({request, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not request.done():
            watch.result()  # raises: the service went away before answering
        result: Iq = request.result()
    except IqError as exc:
        condition = exc.iq["error"]["condition"]
        if condition in OFFLINE:
            raise EnrollmentError(f"the CA service {iq['to']} is not online",
                                  condition) from None
        text = exc.iq["error"]["text"] or condition
        raise EnrollmentError(f"the CA refused: {text}", condition) from None
    except IqTimeout:
        raise EnrollmentError(f"the CA {iq['to']} did not answer within {timeout} s",
                              "timeout") from None
    finally:
        for task in (request, watch):
            task.cancel()
    return result


async def _while_online(xmpp: BaseXMPP, service: JID, every: float = 2.0) -> None:
    """Ping ``service`` every few seconds (each ping on its own, so one that a dying session
    swallowed does not delay the next); raise once its server says the session is gone."""
    offline = asyncio.get_running_loop().create_future()

    def check(ping: asyncio.Future[Iq]) -> None:
        error = None if ping.cancelled() else ping.exception()
        if (isinstance(error, IqError) and error.iq["error"]["condition"] in OFFLINE
                and not offline.done()):
            offline.set_result(None)

    pings: list[asyncio.Future[Iq]] = []
    try:
        while not offline.done():
            await asyncio.wait([offline], timeout=every)
            iq = xmpp.make_iq_get(ito=service)
            iq.enable("ping")
            pings.append(iq.send(timeout=60))
            pings[-1].add_done_callback(check)
    finally:
        for pending in pings:
            pending.cancel()
    raise EnrollmentError(f"the CA service {service} went offline before answering", "offline")


async def enroll(xmpp: BaseXMPP, ca: str, csrs: dict[str, bytes], timeout: int = 30
                 ) -> dict[str, bytes]:
    """Send our CSRs; return {"sign", "encrypt", "ca": PEM}."""
    register()
    iq = xmpp.make_iq_set(ito=service_jid(ca))
    for usage, pem in csrs.items():
        csr = Csr()
        csr["usage"], csr["value"] = usage, pem.decode()
        iq["capsule_enroll"].append(csr)
    answer = pems((await _ask(xmpp, iq, timeout))["capsule_enroll"])
    missing = {"sign", "encrypt", "ca"} - set(answer)
    if missing:
        raise EnrollmentError(f"the CA's answer lacks {', '.join(sorted(missing))}")
    return answer


async def lookup(xmpp: BaseXMPP, ca: str, jid: str, timeout: int = 15) -> CertPair | None:
    """The CA directory's current certificates of ``jid`` (None when it has none)."""
    register()
    iq = xmpp.make_iq_get(ito=service_jid(ca))
    iq["capsule_lookup"]["jid"] = jid
    try:
        found = pems((await _ask(xmpp, iq, timeout))["capsule_lookup"])
    except EnrollmentError as exc:
        if exc.condition == "item-not-found":
            return None
        raise
    if "sign" in found and "encrypt" in found:
        return CertPair(found["sign"], found["encrypt"])
    return None


async def fetch_crl(xmpp: BaseXMPP, ca: str, timeout: int = 15) -> bytes:
    register()
    iq = xmpp.make_iq_get(ito=service_jid(ca))
    iq.enable("capsule_crl")
    text: str = (await _ask(xmpp, iq, timeout))["capsule_crl"]["value"]
    if "BEGIN X509 CRL" not in text:
        raise EnrollmentError("the CA sent no CRL")
    return text.strip().encode() + b"\n"


async def fetch_root(xmpp: BaseXMPP, ca: str, timeout: int = 15) -> bytes:
    """The CA service's root certificate (PEM), not yet trusted."""
    register()
    iq = xmpp.make_iq_get(ito=service_jid(ca))
    iq.enable("capsule_root")
    text: str = (await _ask(xmpp, iq, timeout))["capsule_root"]["value"]
    pem = text.strip().encode() + b"\n"
    try:
        x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise EnrollmentError("the CA sent no root certificate") from None
    return pem


class CaDirectorySource(CertificateSource):
    """The CA's look-up service as a certificate source (the fallback when PEP has none)."""

    def __init__(self, xmpp: BaseXMPP, ca: str, timeout: int = 15):
        self.xmpp, self.ca, self.timeout = xmpp, ca, timeout

    async def fetch(self, jid: str) -> CertPair | None:
        return await lookup(self.xmpp, self.ca, jid, self.timeout)


class FirstFound(CertificateSource):
    """Ask several sources in turn; the first bundle found wins. "None" only when every
    source answered so definitely; else the first failure is raised (fail closed)."""

    def __init__(self, *sources: CertificateSource):
        self.sources = sources

    async def fetch(self, jid: str) -> CertPair | None:
        failure: CapsuleError | None = None
        for source in self.sources:
            try:
                bundle = await source.fetch(jid)
            except CapsuleError as exc:
                failure = failure or exc
                continue
            if bundle is not None:
                return bundle
        if failure is not None:
            raise failure
        return None



def store_crl(profile: Profile, pem: bytes) -> bool:
    """Keep ``pem`` as the profile's CRL if our CA root signed it and it is newer than the one
    held (False: not newer, the stored one stays). The plugin keeps it fresh from then on."""
    if not profile.data.ca_root:
        raise ProfileError("import the CA root before its CRL")
    held = profile.data.crl.encode() if profile.data.crl else None
    if not TrustStore(profile.data.ca_root.encode(), held).update_crl(pem):
        return False
    profile.data.crl = pem.decode()
    return True


async def enroll_profile(xmpp: BaseXMPP, profile: Profile, ca: str, ca_root: bytes | None,
                         confirm: Callable[[str], bool], rotate: bool = False
                         ) -> dict[str, bytes]:
    """Enroll ``profile``'s current keys (new ones when ``rotate``) with the CA service and
    store what comes back.

    An enrollment revokes the JID's former certificates, so everything checkable is checked
    before the CSRs go out: the service's root must match ``ca_root`` when given, else the one
    already in the profile, else be pinned on first use once ``confirm(fingerprint)`` agrees.
    The issued certificates must match our keys, name our JID, chain to that root and not be on
    its CRL. The CRL and the service's JID are stored too (the plugin keeps the CRL fresh from
    there by default). Then the profile is saved and the chain published to PEP.
    """
    jid = profile.data.jid
    if JID(xmpp.boundjid.bare) != JID(jid):
        raise EnrollmentError(f"logged in as {xmpp.boundjid.bare} but the profile is {jid}")
    root = await fetch_root(xmpp, ca)
    expected = ca_root or (profile.data.ca_root.encode() if profile.data.ca_root else None)
    if expected is not None and pem_fingerprint(expected) != pem_fingerprint(root):
        raise EnrollmentError(f"the CA sent root {pem_fingerprint(root)}, not the one we trust "
                              f"({pem_fingerprint(expected)}); nothing was sent to it")
    if expected is None and not confirm(pem_fingerprint(root)):
        raise EnrollmentError("the CA root was not confirmed; nothing was sent to it")
    if rotate:
        profile.rotate_keys()
    answer = await enroll(xmpp, ca, {"sign": profile.csr("sign"), "encrypt": profile.csr("encrypt")})
    if pem_fingerprint(answer["ca"]) != pem_fingerprint(root):
        raise EnrollmentError(f"the CA issued under root {pem_fingerprint(answer['ca'])}, not "
                              f"{pem_fingerprint(root)}")
    crl = await fetch_crl(xmpp, ca)
    trust = TrustStore(root, crl)
    trust.verify(answer["sign"], jid, "sign")
    trust.verify(answer["encrypt"], jid, "encrypt")
    for pem in (root, answer["sign"], answer["encrypt"]):
        profile.import_cert(pem)
    profile.data.crl = None  # a CRL of a former CA must not block this one's
    store_crl(profile, crl)
    profile.data.ca_service = ca
    profile.save()
    chain = {"sign": answer["sign"].decode(), "encrypt": answer["encrypt"].decode(),
             "ca": root.decode()}
    await discovery.publish(xmpp, chain)
    return answer
