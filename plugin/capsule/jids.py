"""Bare JIDs in one canonical form, so that every comparison and every certificate agree.

Two spellings of one account (``Alice@Capsule.Test``, ``alice@capsule.test.``) must never look
like two accounts to the CA's one-certificate-per-usage rule, to revocation by JID or to a trust
check, nor may a certificate name a spelling no client compares equal. slixmpp's JID applies the
stringprep profiles (nodeprep, nameprep) to each part; the trailing dot of a fully qualified
domain is dropped as RFC 7622 §3.2 asks.
"""

from __future__ import annotations

from slixmpp import JID
from slixmpp.jid import InvalidJID


def bare_jid(jid: str) -> str:
    """The normalised form of a bare ``local@domain`` JID; ValueError if ``jid`` is not one."""
    try:
        parsed = JID(jid)
    except InvalidJID as exc:
        raise ValueError(f"not a bare JID (local@domain): {jid!r} ({exc})") from None
    if not parsed.user or parsed.resource or "/" in jid:
        raise ValueError(f"not a bare JID (local@domain): {jid!r}")
    domain = parsed.domain.removesuffix(".")
    if not domain:
        raise ValueError(f"not a bare JID (local@domain): {jid!r}")
    return f"{parsed.user}@{domain}"


def same_jid(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` name the same bare JID (False if either is not a bare JID)."""
    try:
        return bare_jid(a) == bare_jid(b)
    except ValueError:
        return False
