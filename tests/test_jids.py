"""Bare JIDs in their RFC 7622 normal form, and trust checks that compare in that form."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from capsule.errors import UntrustedCertificate
from capsule.jids import bare_jid, same_jid
from capsule.profile import Profile
from capsule.trust import TrustStore
from capsule_ca import Authority


@pytest.mark.parametrize(("given", "normal"), [
    ("alice@capsule.test", "alice@capsule.test"),
    ("Alice@Capsule.Test", "alice@capsule.test"),
    ("ALICE@CAPSULE.TEST.", "alice@capsule.test"),
    ("\u0430lice@capsule.test", "\u0430lice@capsule.test"),  # Cyrillic: stays itself
    ("\u2167@capsule.test", "viii@capsule.test"),  # compatibility form folded by nodeprep
])
def test_normal_form(given: str, normal: str) -> None:
    assert bare_jid(given) == normal


@pytest.mark.parametrize("bad", ["capsule.test", "alice@capsule.test/phone", "alice/x@capsule.test",
                                 "@capsule.test", "a b@capsule.test", "a@b@c", "", "alice@."])
def test_not_a_bare_jid(bad: str) -> None:
    with pytest.raises(ValueError, match="not a bare JID"):
        bare_jid(bad)
    assert not same_jid(bad, "alice@capsule.test")


def test_same_account_in_any_spelling_but_not_a_look_alike() -> None:
    assert same_jid("Alice@Capsule.Test", "alice@capsule.test.")
    assert not same_jid("\u0430lice@capsule.test", "alice@capsule.test")


def test_trust_compares_normalised_jids(authority: Authority,
                                        identity: Callable[[str], Profile]) -> None:
    alice = identity("alice")
    assert alice.data.signing_cert
    pem = alice.data.signing_cert.encode()
    trust = TrustStore(authority.root_pem)
    assert trust.verify(pem, "Alice@Capsule.Test", "sign").cert.serial_number
    with pytest.raises(UntrustedCertificate, match=r"is for alice@capsule\.test"):
        trust.verify(pem, "\u0430lice@capsule.test", "sign")


def test_profiles_hold_the_normal_form(tmp_path: Path) -> None:
    from capsule.profile import FAST_KDF

    profile = Profile.create(tmp_path / "p.capsule", "Bob@Capsule.Test", "a long passphrase of words",
                            kdf=FAST_KDF)
    assert profile.data.jid == "bob@capsule.test"
