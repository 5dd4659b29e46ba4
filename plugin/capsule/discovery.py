"""Certificate discovery over PEP: publish our chain to ``urn:capsule:certs:0``, fetch others'.

The node is open-access and persistent, so a sender finds a recipient's certificates while the
recipient is offline. Servers that keep an older node configuration answer a publish with
``precondition-not-met``; the node is then reconfigured and the publish retried once. A login
reads our own item and the node's options first and publishes only when either differs: a
write costs the server more than two reads, and a fleet logs in far more often than it
changes keys.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import xml.etree.ElementTree as ET

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from slixmpp import JID, BaseXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0004.stanza import Form
from slixmpp.xmlstream import ElementBase

from capsule import namespaces as ns
from capsule.errors import CertificateLookupFailed
from capsule.stanza import Certs, PublishedCert, certs_by_usage
from capsule.trust import CertificateSource, CertPair

log = logging.getLogger(__name__)
PRECONDITION_NOT_MET = "{http://jabber.org/protocol/pubsub#errors}precondition-not-met"
ITEM_ID = "current"
# the answers that mean "no Capsule node": ejabberd says item-not-found; Prosody forbidden (a
# missing node has the default, presence-only access, while ours is always open)
DEFINITELY_NONE = frozenset({"item-not-found", "forbidden"})
# ejabberd refuses pubsub#max_items as a publish option, so it is set only by reconfiguring.
_PUBLISH_OPTIONS = {"pubsub#access_model": "open", "pubsub#persist_items": "true"}
_NODE_CONFIG = {**_PUBLISH_OPTIONS, "pubsub#max_items": "1"}
# settings no publish option carries, restored at login by reconfiguring where the server has
# them: a node that drops our item whenever we go offline (contacts then find no certificates:
# plaintext under policy prefer) or takes others' items is no directory of our keys
_RESTORED = {"pubsub#purge_offline": "0", "pubsub#publish_model": "publishers"}
PUBLISH_OPTIONS_FORM = "http://jabber.org/protocol/pubsub#publish-options"
NODE_CONFIG_FORM = "http://jabber.org/protocol/pubsub#node_config"


def _form(form_type: str, fields: dict[str, str]) -> Form:
    form = Form()
    form["type"] = "submit"
    form.add_field(var="FORM_TYPE", ftype="hidden", value=form_type)
    for var, value in fields.items():
        form.add_field(var=var, value=value)
    return form


def certs_payload(chain: dict[str, str]) -> Certs:
    """A ``<certs/>`` item from {usage: PEM} (usages sign, encrypt, ca)."""
    payload = Certs()
    for usage, pem in chain.items():
        der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
        cert = PublishedCert()
        cert["usage"] = usage
        cert["value"] = base64.b64encode(der).decode()
        payload.append(cert)
    return payload


def der_to_pem(text: str) -> bytes:
    """A published certificate (base64 DER) as PEM; ValueError if it is not one."""
    der = base64.b64decode(text.strip(), validate=True)
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


async def publish(xmpp: BaseXMPP, chain: dict[str, str], timeout: int = 15) -> None:
    await publish_item(xmpp, ns.CERTS_NODE, certs_payload(chain), timeout)


def holds_chain(payloads: list[ET.Element] | None, chain: dict[str, str]) -> bool:
    """Whether a PEP item's payloads are exactly one ``<certs/>`` with ``chain``'s
    certificates (same usages, same DER; nothing else)."""
    if payloads is None or len(payloads) != 1:
        return False
    held = _certs(payloads[0])
    return held is not None and held == _certs(certs_payload(chain).xml)


def _certs(payload: ET.Element) -> list[tuple[str, bytes]] | None:
    """A ``<certs/>`` payload's (usage, DER) pairs, sorted; None if anything else is in it."""
    if payload.tag != Certs.tag_name():
        return None
    try:
        found = sorted((c.get("usage", ""), base64.b64decode((c.text or "").strip(), validate=True))
                       for c in payload if c.tag == PublishedCert.tag_name())
    except ValueError:
        return None
    return found if len(found) == len(payload) else None


async def published_item(xmpp: BaseXMPP, node: str, timeout: int, what: str
                         ) -> tuple[list[ET.Element] | None, bool]:
    """Our own item ``current`` on ``node`` (as :func:`fetch_item`: raises
    CertificateLookupFailed) and, read at the same time, whether the node has the options a
    publish sets (False when that read fails: then a publish sets them)."""
    item, configured = await asyncio.gather(
        fetch_item(xmpp, xmpp.boundjid.bare, node, timeout, what),
        _configured(xmpp, node, timeout), return_exceptions=True)
    if isinstance(item, BaseException):
        raise item
    return item, configured is True


async def _configured(xmpp: BaseXMPP, node: str, timeout: int) -> bool:
    """Whether the node has the options a publish sets; settings only a reconfiguration
    restores (_RESTORED) are put right here, when they differ."""
    pubsub = xmpp.plugin["xep_0060"]
    try:
        iq = await pubsub.get_node_config(None, node, timeout=timeout)
    except (IqError, IqTimeout):
        return False
    values = iq["pubsub_owner"]["configure"]["form"].get_values()
    wrong = {var: value for var, value in _RESTORED.items()
             if var in values and _plain(values[var]) != value}
    if wrong:
        log.info("PEP node %s had %s; restoring it", node, ", ".join(sorted(wrong)))
        try:
            await pubsub.set_node_config(None, node, _form(NODE_CONFIG_FORM, wrong),
                                         timeout=timeout)
        except (IqError, IqTimeout) as exc:
            log.warning("could not restore the options of PEP node %s: %s", node,
                        exc.iq["error"]["condition"])
    return (values.get("pubsub#access_model") == _PUBLISH_OPTIONS["pubsub#access_model"]
            and _plain(values.get("pubsub#persist_items")) == "1")


def _plain(value: object) -> str:
    """A form value as our option tables write it (booleans as "1"/"0")."""
    text = str(value).lower()
    return {"true": "1", "false": "0"}.get(text, text)


async def publish_item(xmpp: BaseXMPP, node: str, payload: ElementBase | ET.Element,
                       timeout: int = 15) -> None:
    """Publish item ``current`` of one of our open, persistent PEP nodes."""
    pubsub = xmpp.plugin["xep_0060"]
    options = _form(PUBLISH_OPTIONS_FORM, _PUBLISH_OPTIONS)
    try:
        await pubsub.publish(None, node, id=ITEM_ID, payload=payload, options=options,
                             timeout=timeout)
        return
    except IqError as exc:
        # the application condition of XEP-0060 7.1.5, which slixmpp does not parse
        if exc.iq["error"].xml.find(PRECONDITION_NOT_MET) is None:
            raise
    log.info("PEP node %s has other options; reconfiguring it", node)
    await pubsub.set_node_config(None, node, _form(NODE_CONFIG_FORM, _NODE_CONFIG),
                                 timeout=timeout)
    await pubsub.publish(None, node, id=ITEM_ID, payload=payload, options=options,
                         timeout=timeout)


async def fetch_item(xmpp: BaseXMPP, jid: str, node: str, timeout: int, what: str
                     ) -> list[ET.Element] | None:
    """The payloads of ``jid``'s item ``current`` on ``node`` (maybe none); None only on a
    definite "none" (DEFINITELY_NONE, no items); any other answer raises
    CertificateLookupFailed."""
    try:
        iq = await xmpp.plugin["xep_0060"].get_item(JID(jid), node, ITEM_ID, timeout=timeout)
    except IqError as exc:
        if exc.condition in DEFINITELY_NONE:
            return None
        raise CertificateLookupFailed(f"looking up {jid}'s {what} failed: "
                                      f"{exc.condition}") from None
    except IqTimeout:
        raise CertificateLookupFailed(f"timed out fetching {jid}'s {what}") from None
    items = list(iq["pubsub"]["items"])
    if not items:
        return None
    return [child for item in items for child in item.xml]


class PepSource(CertificateSource):
    """Reads a contact's published certificates from their PEP node."""

    def __init__(self, xmpp: BaseXMPP, timeout: int = 10):
        self.xmpp = xmpp
        self.timeout = timeout

    async def fetch(self, jid: str) -> CertPair | None:
        """The published bundle; None only on a definite "none" (DEFINITELY_NONE, no items).

        A time-out, any other error or an item without usable certificates is no answer:
        CertificateLookupFailed, so that policy ``prefer`` never falls back to plaintext on it.
        """
        payloads = await fetch_item(self.xmpp, jid, ns.CERTS_NODE, self.timeout,
                                    "Capsule certificates")
        if payloads is None:
            return None
        for payload in payloads:
            found = certs_by_usage(Certs(xml=payload)["certs"], der_to_pem)
            if "sign" in found and "encrypt" in found:
                return CertPair(sign=found["sign"], encrypt=found["encrypt"])
        raise CertificateLookupFailed(f"{jid} published a Capsule item without usable "
                                      f"certificates")
