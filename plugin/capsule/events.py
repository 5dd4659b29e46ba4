"""What the plugin tells the app: the payloads of its events, and the failure report.

``capsule_error`` carries a :class:`CapsuleFailure` (a reason to match on, never plaintext);
``capsule_plaintext_sent`` a :class:`PlaintextSent`; a decrypted message carries a
:class:`CapsuleInfo` (:func:`capsule_info`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from slixmpp import BaseXMPP, Message
from slixmpp.xmlstream import StanzaBase

from capsule.errors import CapsuleError
from capsule.trust import VerifiedCert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CapsuleInfo:
    """Attached to every decrypted message as ``msg.capsule_info``."""

    sender: str
    sender_cert: VerifiedCert
    nid: str
    timestamp: str
    version: int  # the wire format: 0 (RSA-OAEP, no forward secrecy) or 1 (session keys)
    encrypted: bool = True
    # accepted before a crash that came before its "handed" mark: the app may have had it then
    # (a kill inside its handler); an app that must act once dedupes these by nid
    recovered: bool = False

    @property
    def forward_secret(self) -> bool:
        """Sealed to session keys (v1); under ``forward_secrecy='prefer'`` a v0 is a downgrade."""
        return self.version == 1


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


def failure(exc: CapsuleError, stanza: StanzaBase | None, peer: str) -> CapsuleFailure:
    return CapsuleFailure(exc.reason, str(exc), stanza["id"] if stanza else "", peer, exc)


def fail(xmpp: BaseXMPP, exc: CapsuleError, stanza: StanzaBase | None, peer: str) -> None:
    """Log a refusal and raise ``capsule_error`` for it."""
    about = "".join([f" for stanza {stanza['id']}" if stanza else "",
                     f" with {peer}" if peer else ""])
    log.warning("capsule %s%s: %s", exc.reason, about, exc)
    xmpp.event("capsule_error", failure(exc, stanza, peer))
