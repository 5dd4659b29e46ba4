"""Certificate trust: chain, validity, usage, SAN, CRL, each refused with its own reason."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from capsule.errors import RevokedCertificate, UntrustedCertificate
from capsule.profile import Profile, spki
from capsule.testing.identities import enroll
from capsule.trust import CertPair, TrustStore
from capsule_ca import Authority

from .helpers import PIN


def bundle(p: Profile) -> CertPair:
    assert p.data.signing_cert and p.data.encryption_cert
    return CertPair(p.data.signing_cert.encode(), p.data.encryption_cert.encode())


def test_valid_contact_verifies_and_is_cached(authority: Authority, identity: Callable[[str], Profile],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    bob = identity("bob")
    trust = TrustStore(authority.root_pem)
    contact = trust.verify_contact("bob@capsule.test", bundle(bob))
    assert spki(contact.sign.public_key) == spki(bob.data.signing_key.public_key())
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(trust, "_check", lambda *a: calls.append(a))
    assert trust.verify_contact("bob@capsule.test", bundle(bob)) == contact
    assert calls == []  # served from the cache


def test_san_must_match_the_jid(authority: Authority, identity: Callable[[str], Profile]) -> None:
    carol = identity("carol")
    with pytest.raises(UntrustedCertificate, match=r"is for carol@capsule\.test, not bob@capsule\.test"):
        TrustStore(authority.root_pem).verify_contact("bob@capsule.test", bundle(carol))


def test_usage_must_match(authority: Authority, identity: Callable[[str], Profile]) -> None:
    bob = identity("bob")
    assert bob.data.encryption_cert
    with pytest.raises(UntrustedCertificate, match="not for signing"):
        TrustStore(authority.root_pem).verify(bob.data.encryption_cert.encode(), "bob@capsule.test",
                                             "sign")


def test_other_ca_is_refused(tmp_path: Path, authority: Authority,
                             identity: Callable[[str], Profile]) -> None:
    other = Authority.init(tmp_path / "other", "Other CA", b"other passphrase")
    mallory = enroll(other, tmp_path / "m.capsule", "bob@capsule.test", PIN)
    with pytest.raises(UntrustedCertificate, match="not issued by our CA"):
        TrustStore(authority.root_pem).verify_contact("bob@capsule.test", bundle(mallory))


def test_expired_is_refused(tmp_path: Path, authority: Authority) -> None:
    now = dt.datetime.now(dt.UTC)
    old = enroll(authority, tmp_path / "old.capsule", "old@capsule.test", PIN,
                 not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    with pytest.raises(UntrustedCertificate, match="expired on"):
        TrustStore(authority.root_pem).verify_contact("old@capsule.test", bundle(old))


def test_revoked_is_refused_once_the_crl_arrives(authority: Authority,
                                                identity: Callable[[str], Profile]) -> None:
    dave = identity("dave")
    trust = TrustStore(authority.root_pem, authority.crl_path.read_bytes())
    trust.verify_contact("dave@capsule.test", bundle(dave))
    authority.revoke(jid="dave@capsule.test")
    assert trust.update_crl(authority.crl_path.read_bytes())
    with pytest.raises(RevokedCertificate, match="is revoked"):
        trust.verify_contact("dave@capsule.test", bundle(dave))


def test_crl_from_another_ca_is_refused(tmp_path: Path, authority: Authority) -> None:
    other = Authority.init(tmp_path / "other", "Other CA", b"other passphrase")
    with pytest.raises(UntrustedCertificate, match="not signed by our CA"):
        TrustStore(authority.root_pem, other.crl_path.read_bytes())
