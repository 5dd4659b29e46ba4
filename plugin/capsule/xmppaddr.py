"""id-on-xmppAddr (RFC 6120 §13.7.1.4): the SAN otherName that binds a certificate to a bare JID."""

from __future__ import annotations

from cryptography import x509

ID_ON_XMPPADDR = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")


def encode_utf8string(text: str) -> bytes:
    """Encode ``text`` as a DER UTF8String (tag 0x0c, definite length)."""
    raw = text.encode("utf-8")
    if len(raw) < 0x80:
        return b"\x0c" + bytes([len(raw)]) + raw
    size = len(raw).to_bytes((len(raw).bit_length() + 7) // 8, "big")
    return b"\x0c" + bytes([0x80 | len(size)]) + size + raw


def xmppaddr_name(jid: str) -> x509.OtherName:
    """The SAN otherName naming ``jid`` (what a CSR asks the CA to certify)."""
    return x509.OtherName(ID_ON_XMPPADDR, encode_utf8string(jid))


def decode_utf8string(der: bytes) -> str:
    """Decode a DER UTF8String (tag 0x0c), the encoding RFC 6120 prescribes for xmppAddr."""
    if len(der) < 2 or der[0] != 0x0C:
        raise ValueError("xmppAddr is not a DER UTF8String")
    length, offset = der[1], 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or len(der) < 2 + n:
            raise ValueError("xmppAddr has a bad DER length")
        length, offset = int.from_bytes(der[2 : 2 + n], "big"), 2 + n
    if len(der) != offset + length:
        raise ValueError("xmppAddr DER length does not match its content")
    return der[offset:].decode("utf-8")


def san_jids(san: x509.SubjectAlternativeName) -> list[str]:
    """All xmppAddr JIDs named in a SubjectAlternativeName extension."""
    return [
        decode_utf8string(name.value)
        for name in san
        if isinstance(name, x509.OtherName) and name.type_id == ID_ON_XMPPADDR
    ]


def cert_jids(cert: x509.Certificate) -> list[str]:
    """The xmppAddr JIDs of a certificate (empty if it has no SAN)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san_jids(ext.value)
