"""Certificate profiles: the X.509 extensions each kind of certificate gets.

Rendered into an openssl ``-extfile`` per issuance so that the SAN (which holds
user input) lives in its own section, never spliced into a comma-separated list.
"""

from __future__ import annotations

from enum import StrEnum

from capsule.xmppaddr import ID_ON_XMPPADDR


class Usage(StrEnum):
    """What a certificate is for; also stored as the subject's OU."""

    SIGN = "sign"
    ENCRYPT = "encrypt"
    CLIENT = "client"
    SERVER = "server"


_KEY_USAGE = {
    Usage.SIGN: "critical, digitalSignature, nonRepudiation",
    Usage.ENCRYPT: "critical, keyEncipherment",
    Usage.CLIENT: "critical, digitalSignature",
    Usage.SERVER: "critical, digitalSignature, keyEncipherment",
}
_EXT_KEY_USAGE = {Usage.CLIENT: "clientAuth", Usage.SERVER: "serverAuth"}


def conf_escape(value: str) -> str:
    """Escape a value for an openssl config file (``$`` expands, ``#`` comments)."""
    for ch in "\\$#\"'":
        value = value.replace(ch, "\\" + ch)
    return value


def render_extfile(usage: Usage, san: list[tuple[str, str]]) -> str:
    """An openssl extension file with section ``leaf`` for ``usage`` and the given SAN entries.

    ``san`` holds (kind, value) pairs with kind one of ``xmpp``, ``email``, ``DNS``, ``IP``.
    """
    lines = [
        "[ leaf ]",
        "basicConstraints = critical, CA:FALSE",
        f"keyUsage = {_KEY_USAGE[usage]}",
        "subjectKeyIdentifier = hash",
        "authorityKeyIdentifier = keyid",
        "subjectAltName = @san",
    ]
    if usage in _EXT_KEY_USAGE:
        lines.append(f"extendedKeyUsage = {_EXT_KEY_USAGE[usage]}")
    lines += ["", "[ san ]"]
    counts: dict[str, int] = {}
    for kind, value in san:
        key = "otherName" if kind == "xmpp" else kind
        if kind == "xmpp":
            # FORMAT:UTF8 or openssl reads the value as Latin-1 and encodes it twice
            value = f"{ID_ON_XMPPADDR.dotted_string};FORMAT:UTF8,UTF8:{value}"
        index = counts.get(key, 0)
        counts[key] = index + 1
        lines.append(f"{key}.{index} = {conf_escape(value)}")
    return "\n".join(lines) + "\n"
