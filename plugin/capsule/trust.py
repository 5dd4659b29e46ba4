"""Trust: verify contacts' certificates against our CA root and CRL, and cache the verdicts.

A certificate is trusted for a JID and a usage when it is directly issued by the configured CA
root, is inside its validity window, is an end-entity certificate with the right key usage and
an RSA key of an accepted size, names exactly that bare JID in SAN id-on-xmppAddr, and is not
on the CA's CRL. Verdicts are cached by certificate fingerprint so a conversation does not redo
the chain check on every message; the cache is cleared when a new CRL arrives.

Whether a certificate is revoked is known only while the CRL is fresh: ``check_crl`` refuses
when there is none or its nextUpdate has passed (a server withholding the CA's newer CRL must not
keep a revoked certificate usable). JIDs are compared in their RFC 7622 normal form.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from capsule import algorithms as alg
from capsule.core import cert_fingerprint
from capsule.errors import RevocationUnknown, RevokedCertificate, StaleCrl, UntrustedCertificate
from capsule.jids import same_jid
from capsule.xmppaddr import cert_jids

Clock = Callable[[], dt.datetime]


@dataclass(frozen=True)
class CertPair:
    """A contact's certificates as published (PEM)."""

    sign: bytes
    encrypt: bytes


class CertificateSource(abc.ABC):
    """Where a contact's certificates come from (PEP, the CA directory, a file…)."""

    @abc.abstractmethod
    async def fetch(self, jid: str) -> CertPair | None:
        """The certificates ``jid`` published, or None only on a definite answer that there
        are none (which lets policy ``prefer`` send plaintext); any doubt raises a CapsuleError
        (CertificateLookupFailed)."""


@dataclass(frozen=True)
class VerifiedCert:
    jid: str
    usage: str
    cert: x509.Certificate
    fingerprint: str
    public_key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey

    @property
    def rsa_key(self) -> rsa.RSAPublicKey:
        """The key of an encryption certificate (always RSA: :meth:`TrustStore` checks)."""
        if not isinstance(self.public_key, rsa.RSAPublicKey):
            raise UntrustedCertificate(f"{self.jid}'s {self.usage} certificate has no RSA key")
        return self.public_key


@dataclass(frozen=True)
class VerifiedContact:
    """A contact whose signing and encryption certificates both verified."""

    jid: str
    sign: VerifiedCert
    encrypt: VerifiedCert


class TrustStore:
    """Verifies certificates against one CA root (and its CRL), caching the verdicts."""

    def __init__(self, ca_root_pem: bytes, crl_pem: bytes | None = None,
                 clock: Clock | None = None):
        try:
            self.root = x509.load_pem_x509_certificate(ca_root_pem)
        except ValueError:
            raise UntrustedCertificate("the configured CA root is not a PEM certificate") from None
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._cache: dict[tuple[bytes, str, str], VerifiedCert] = {}  # (PEM, jid, usage)
        self.crl: x509.CertificateRevocationList | None = None
        if crl_pem:
            self.update_crl(crl_pem)

    def update_crl(self, crl_pem: bytes) -> bool:
        """Install a CRL signed by our root; False if it is not newer than the current one."""
        try:
            crl = x509.load_pem_x509_crl(crl_pem)
        except ValueError:
            raise UntrustedCertificate("the CRL is not a PEM CRL") from None
        if crl.issuer != self.root.subject or not crl.is_signature_valid(
                self.root.public_key()):  # type: ignore[arg-type]
            raise UntrustedCertificate("the CRL is not signed by our CA")
        if self.crl is not None and _crl_number(crl) <= _crl_number(self.crl):
            return False  # the same or an older CRL
        self.crl = crl
        self._cache.clear()
        return True

    def check_crl(self) -> None:
        """Raise RevocationUnknown (StaleCrl) unless a CRL is installed and not past nextUpdate."""
        if self.crl is None:
            raise RevocationUnknown("no CRL from our CA: revocation status unknown")
        next_update = self.crl.next_update_utc
        if next_update is None or self._clock() > next_update:
            when = f"{next_update:%Y-%m-%d %H:%M}Z" if next_update else "(no nextUpdate)"
            raise StaleCrl(f"the CA's CRL expired {when}: revocation status unknown "
                           f"until a fresh CRL arrives")

    def verify(self, pem: bytes, jid: str, usage: str) -> VerifiedCert:
        """Verify one certificate for ``jid`` and ``usage`` ("sign" or "encrypt")."""
        now = self._clock()
        cached = self._cache.get((pem, jid, usage))
        if cached is not None and cached.cert.not_valid_after_utc >= now:
            return cached
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise UntrustedCertificate(f"{jid}'s {usage} certificate is not PEM") from None
        fp = cert_fingerprint(cert)
        verified = self._check(cert, fp, jid, usage, now)
        self._cache[(pem, jid, usage)] = verified
        return verified

    def verify_contact(self, jid: str, bundle: CertPair) -> VerifiedContact:
        return VerifiedContact(jid, self.verify(bundle.sign, jid, "sign"),
                       self.verify(bundle.encrypt, jid, "encrypt"))

    def _check(self, cert: x509.Certificate, fp: str, jid: str, usage: str,
               now: dt.datetime) -> VerifiedCert:
        what = f"{jid}'s {usage} certificate"
        try:
            cert.verify_directly_issued_by(self.root)
        except (ValueError, TypeError, InvalidSignature):
            raise UntrustedCertificate(f"{what} is not issued by our CA") from None
        if now < cert.not_valid_before_utc:
            raise UntrustedCertificate(f"{what} is not valid before {cert.not_valid_before_utc}")
        if now > cert.not_valid_after_utc:
            raise UntrustedCertificate(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise UntrustedCertificate(f"{what} lacks basicConstraints or keyUsage") from None
        if bc.ca:
            raise UntrustedCertificate(f"{what} is a CA certificate")
        if usage == "sign" and not (ku.digital_signature and ku.content_commitment):
            raise UntrustedCertificate(f"{what} is not for signing (keyUsage)")
        if usage == "encrypt" and not ku.key_encipherment:
            raise UntrustedCertificate(f"{what} is not for key encipherment (keyUsage)")
        key = cert.public_key()
        if not (usage == "sign" and isinstance(key, ed25519.Ed25519PublicKey)) and not (
                isinstance(key, rsa.RSAPublicKey) and key.key_size in alg.ACCEPTED_RSA_BITS):
            raise UntrustedCertificate(f"{what} has no accepted RSA key"
                                       + (" or Ed25519 key" if usage == "sign" else ""))
        try:
            names = cert_jids(cert)
        except ValueError as exc:
            raise UntrustedCertificate(f"{what} has a malformed xmppAddr: {exc}") from None
        if len(names) != 1 or not same_jid(names[0], jid):
            raise UntrustedCertificate(f"{what} is for {', '.join(names) or 'no JID'}, not {jid}")
        if self.crl is not None and self.crl.get_revoked_certificate_by_serial_number(
                cert.serial_number) is not None:
            raise RevokedCertificate(f"{what} (serial {cert.serial_number:X}) is revoked")
        return VerifiedCert(jid, usage, cert, fp, key)


def _crl_number(crl: x509.CertificateRevocationList) -> tuple[int, dt.datetime]:
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return number, crl.last_update_utc
