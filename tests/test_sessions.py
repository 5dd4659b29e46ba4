"""Session keys in the profile: Ed25519 signing from our CA, records that verify through the
trust store, and forward secrecy: destroyed at the end of retention, and then nothing opens."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from capsule import algorithms as alg
from capsule import core, sessions, signatures, stanza_v1, v1
from capsule.audit.findings import StoredRow
from capsule.audit.verdicts import Auditor, CertificateBundle
from capsule.errors import (
    DecryptionFailed,
    InvalidSessionRecord,
    NotAddressedToUs,
    ProfileError,
    SessionExpired,
)
from capsule.profile import FAST_KDF, MAGIC, Profile
from capsule.stanza import FALLBACK_BODY
from capsule.trust import CertPair, TrustStore
from capsule_ca import Authority
from capsule_ca.errors import UnsupportedKey
from capsule_ca.profiles import Usage

from .helpers import PIN, seal_v1

NOW = 1_800_000_000
DAY = 86400


def bundle(p: Profile) -> CertPair:
    assert p.data.signing_cert and p.data.encryption_cert
    return CertPair(sign=p.data.signing_cert.encode(), encrypt=p.data.encryption_cert.encode())


def test_new_profiles_sign_with_ed25519_and_rsa_stays_available(tmp_path: Path) -> None:
    ed = Profile.create(tmp_path / "ed.capsule", "ed@capsule.test", PIN, kdf=FAST_KDF,
                        short_pin=True)
    assert isinstance(ed.data.signing_key, ed25519.Ed25519PrivateKey)
    assert isinstance(ed.data.encryption_key, rsa.RSAPrivateKey)
    old = Profile.create(tmp_path / "rsa.capsule", "rsa@capsule.test", PIN, kdf=FAST_KDF,
                         short_pin=True, signing="rsa")
    assert isinstance(Profile.load(old.path, PIN).data.signing_key, rsa.RSAPrivateKey)
    assert isinstance(Profile.load(ed.path, PIN).data.signing_key, ed25519.Ed25519PrivateKey)
    with pytest.raises(ProfileError):
        Profile.create(tmp_path / "x.capsule", "x@capsule.test", PIN, kdf=FAST_KDF,
                       short_pin=True, signing="dsa")


def test_ca_certifies_ed25519_for_signing_and_trust_accepts_it(
        authority: Authority, identity: Callable[[str], Profile]) -> None:
    bob = identity("bob")
    contact = TrustStore(authority.root_pem, authority.crl_path.read_bytes()).verify_contact(
        bob.data.jid, bundle(bob))
    assert isinstance(contact.sign.public_key, ed25519.Ed25519PublicKey)
    assert isinstance(contact.encrypt.public_key, rsa.RSAPublicKey)


def test_published_record_verifies_through_the_senders_trust_store(
        authority: Authority, identity: Callable[[str], Profile]) -> None:
    bob = identity("bob")
    bob.new_session(NOW)
    record = bob.current_sessions(NOW + 60)[0]
    contact = TrustStore(authority.root_pem, authority.crl_path.read_bytes()).verify_contact(
        bob.data.jid, bundle(bob))
    valid, refused = sessions.select([record], bob.data.jid, contact.sign.fingerprint,
                                     contact.sign.public_key, NOW + 60, 300)
    assert valid == [record] and not refused
    valid, _ = sessions.select([record], "carol@capsule.test", contact.sign.fingerprint,
                               contact.sign.public_key, NOW + 60, 300)
    assert valid == []  # bob's record on carol's node


def test_session_keys_survive_save_and_load_and_are_published_newest_first(
        identity: Callable[[str], Profile]) -> None:
    bob = identity("bob")
    for i in range(10):
        bob.new_session(NOW + i * 3600)
    bob.save()
    again = Profile.load(bob.path, PIN)
    assert again.session_keys().keys() == bob.session_keys().keys()
    published = again.current_sessions(NOW + 9 * 3600)
    assert len(published) == alg.SESSIONS_PUBLISHED
    assert published[0].created == core.utc_timestamp(
        dt.datetime.fromtimestamp(NOW + 9 * 3600, dt.UTC))
    assert again.current_sessions(NOW + 60 * DAY) == []


def test_session_key_needs_an_enrolled_signing_certificate(tmp_path: Path) -> None:
    p = Profile.create(tmp_path / "p.capsule", "p@capsule.test", PIN, kdf=FAST_KDF,
                       short_pin=True)
    with pytest.raises(ProfileError):
        p.new_session(NOW)


def _plaintext_profile(p: Profile) -> bytes:
    """The profile file decrypted with its key: everything a thief with the PIN gets."""
    line, _, body = p.path.read_bytes().partition(b"\n")
    assert line.startswith(MAGIC)
    nonce = base64.b64decode(json.loads(line[len(MAGIC):])["nonce"])
    return AESGCM(p._key).decrypt(nonce, body, line)


def test_after_retention_nothing_on_disk_opens_the_archived_capsule(
        identity: Callable[[str], Profile]) -> None:
    """Forward secrecy, directly: a capsule taken from the archive opens within the window;
    once the session keys are destroyed, no key the profiles hold (reloaded from disk with the
    PIN: session keys, RSA encryption keys) opens it, and the raw key is nowhere in the file."""
    alice, bob = identity("alice"), identity("bob")
    alice.new_session(NOW)
    bob.new_session(NOW)
    alice.save()
    bob.save()
    archived = seal_v1(alice, bob, NOW + 60)
    raw_keys = {p.data.jid: p.data.sessions[0].to_json()["key"] for p in (alice, bob)}
    for p in (alice, bob):  # within retention: both the recipient and the sender's history
        assert b"must not give" in v1.unseal(archived, jid=p.data.jid, sessions=p.session_keys())
        assert p.destroy_sessions(NOW + 2 * DAY + 14 * DAY - 1) == 0
    for p in (alice, bob):
        assert p.destroy_sessions(NOW + 2 * DAY + 14 * DAY) == 1
        p.save()  # the plugin saves at once (DurableState), the CLI too
    for p in (alice, bob):
        thief = Profile.load(p.path, PIN)  # the disk as left, opened with the PIN
        assert thief.session_keys() == {}
        with pytest.raises(SessionExpired):
            v1.unseal(archived, jid=p.data.jid, sessions=thief.session_keys(),
                      destroyed=thief.destroyed_sessions())
        for key in (thief.data.encryption_key, *(k for _, k in thief.data.retired)):
            for entry in archived.header.keys:  # no long-term key unwraps any entry either
                with pytest.raises((ValueError, DecryptionFailed)):
                    key.decrypt(entry.wrapped, alg.oaep())
        assert raw_keys[p.data.jid].encode() not in _plaintext_profile(thief)
        with pytest.raises(NotAddressedToUs):  # and a fresh session key is no help
            thief.new_session(NOW + 20 * DAY)
            v1.unseal(archived, jid=p.data.jid, sessions=thief.session_keys())


def test_retention_is_bounded(identity: Callable[[str], Profile]) -> None:
    bob = identity("bob")
    with pytest.raises(ProfileError):
        bob.destroy_sessions(NOW, retention=alg.SESSION_MAX_RETENTION_S + 1)
    with pytest.raises(ProfileError):
        bob.destroy_sessions(NOW, retention=-1)


@pytest.mark.parametrize("sign", [None, "rsa"])
def test_profile_init_command_picks_the_signing_key(tmp_path: Path, sign: str | None) -> None:
    """`capsule profile init [--sign rsa]` as a user types it: Ed25519 unless asked for RSA,
    and the signing CSR carries that key."""
    profile = tmp_path / "gil.capsule"
    args = [str(Path(sys.executable).parent / "capsule"), "profile", "init", "--profile",
            str(profile), "--jid", "gil@capsule.test", *(["--sign", sign] if sign else [])]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CAPSULE_PIN": "7319024685"})
    assert proc.returncode == 0, proc.stderr
    csr = x509.load_pem_x509_csr(profile.with_name("gil.capsule.sign.csr").read_bytes())
    expected = rsa.RSAPublicKey if sign == "rsa" else ed25519.Ed25519PublicKey
    assert isinstance(csr.public_key(), expected) and csr.is_signature_valid


def test_ca_refuses_ed25519_for_anything_but_signing(authority: Authority, tmp_path: Path) -> None:
    p = Profile.create(tmp_path / "h.capsule", "hal@capsule.test", PIN, kdf=FAST_KDF,
                       short_pin=True)
    csr = p.csr("sign")  # an Ed25519 key asking to be an encryption certificate
    before = authority.valid_for("hal@capsule.test")  # the CA is shared by the session's tests
    with pytest.raises(UnsupportedKey):
        authority.issue(csr, "hal@capsule.test", Usage.ENCRYPT)
    assert authority.valid_for("hal@capsule.test") == before


def test_the_audit_verifies_v1_from_certificates_alone(
        authority: Authority, identity: Callable[[str], Profile]) -> None:
    """A v1 capsule as an archive stores it: the audit (root + signing certificates, no key of
    any kind) calls it a capsule, and a copy with one payload bit changed a bad signature."""
    alice, bob = identity("alice"), identity("bob")
    alice.new_session(NOW)
    bob.new_session(NOW)
    capsule = seal_v1(alice, bob, NOW + 60)
    bundle = CertificateBundle()
    assert alice.data.signing_cert
    bundle.add_pem(alice.data.signing_cert.encode())
    auditor = Auditor(authority.root_pem, bundle)

    def row(c: v1.Capsule, i: int) -> StoredRow:
        xml = ET.tostring(stanza_v1.build(c), "unicode")
        return StoredRow("archive", str(i), bob.data.jid, None,
                         f'<message from="{alice.data.jid}/phone" to="{bob.data.jid}" '
                         f'type="chat">{xml}<body>{FALLBACK_BODY}</body></message>')

    flipped = dataclasses.replace(capsule, payload=bytes([capsule.payload[0] ^ 1])
                                  + capsule.payload[1:])
    verdicts = [auditor.examine(row(c, i)).verdict for i, c in enumerate([capsule, flipped])]
    assert verdicts == ["capsule", "bad-signature"]


def test_rotation_at_login_daily_and_not_in_a_reconnect_loop(
        identity: Callable[[str], Profile]) -> None:
    from typing import Any, cast

    from capsule.keyring import Keyring
    bob = identity("bob")
    ring = Keyring(cast(Any, None), bob, rotate=alg.SESSION_ROTATE_S,
                   retention=alg.SESSION_RETENTION_S, skew=300, timeout=5, refresh=3600)
    assert ring.rotate(NOW, force=True)  # the first login
    assert not ring.rotate(NOW + 60, force=True)  # a reconnect a minute later: no new key
    assert ring.rotate(NOW + 700, force=True)  # a later login
    assert not ring.rotate(NOW + 3600)  # the hourly check
    assert ring.rotate(NOW + 700 + DAY)  # daily
    assert len(bob.data.sessions) == 3  # each True: the caller saved
    assert ring.own(NOW + 700 + DAY) == bob.current_sessions(NOW + 700 + DAY)[0]
    old = set(bob.session_keys())
    later = NOW + 700 + DAY + 2 * DAY + 14 * DAY
    assert ring.rotate(later)  # all three past retention: destroyed, a fresh one made
    bob.save()  # what the plugin does when rotate reports a change
    assert len(bob.data.sessions) == 1 and len(bob.data.destroyed) == 3
    on_disk = Profile.load(bob.path, PIN)
    assert not old & set(on_disk.session_keys()) and on_disk.destroyed_sessions() == old


# The low-order points of Curve25519 (canonical and not): X25519 with any of them gives the
# all-zero secret whatever our key, so a record naming one is refused (RFC 7748, 6.1).
LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"),
             bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
             bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
             bytes.fromhex("ec" + "ff" * 30 + "7f"), bytes.fromhex("ed" + "ff" * 30 + "7f"),
             bytes.fromhex("ee" + "ff" * 30 + "7f"), bytes(31) + b"\x80"]


@pytest.mark.parametrize("pub", LOW_ORDER, ids=range(len(LOW_ORDER)))
def test_a_signed_record_for_a_low_order_point_is_refused(
        identity: Callable[[str], Profile], pub: bytes) -> None:
    bob = identity("bob")
    good = bob.new_session(NOW).record
    hostile = dataclasses.replace(good, pub=pub, signature=b"")
    hostile = dataclasses.replace(hostile, signature=signatures.sign(
        bob.data.signing_key, sessions.session_bytes(bob.data.jid, hostile)))
    signer = bob.data.signing_key.public_key()
    with pytest.raises(InvalidSessionRecord):
        sessions.check(hostile, bob.data.jid, good.cert, signer, NOW + 60, 300)
    sessions.check(good, bob.data.jid, good.cert, signer, NOW + 60, 300)


def test_a_certificate_rotation_gives_a_new_session_record_at_once(
        authority: Authority, identity: Callable[[str], Profile]) -> None:
    """After `capsule rotate` our published record must name the new signing certificate (or
    contacts refuse it), even if the last session key is only minutes old."""
    from typing import Any, cast

    from capsule.keyring import Keyring
    dave = identity("dave")
    ring = Keyring(cast(Any, None), dave, rotate=alg.SESSION_ROTATE_S,
                   retention=alg.SESSION_RETENTION_S, skew=300, timeout=5, refresh=3600)
    assert ring.rotate(NOW - 300, force=True)  # a login five minutes ago
    dave.rotate_keys()  # what `capsule rotate` does: new keys, new certificates
    for usage in (Usage.SIGN, Usage.ENCRYPT):
        dave.import_cert(authority.issue(dave.csr(usage.value), dave.data.jid, usage,
                                         replace=True).pem())
    assert ring.rotate(NOW, force=True)  # the next login
    record = ring.own(NOW)
    assert record is not None
    fingerprint = core.cert_fingerprint(x509.load_pem_x509_certificate(bundle(dave).sign))
    sessions.check(record, dave.data.jid, fingerprint, dave.data.signing_key.public_key(), NOW,
                   300)


def test_profile_show_destroys_expired_session_keys_and_lists_the_others(
        identity: Callable[[str], Profile]) -> None:
    """`capsule profile show` as a user types it: opening the profile destroys what is past
    retention (on disk), and the session keys left are listed without any secret."""
    bob = identity("bob")
    now = int(dt.datetime.now(dt.UTC).timestamp())
    old = bob.new_session(now - 40 * DAY)
    current = bob.new_session(now)
    bob.save()
    proc = subprocess.run([str(Path(sys.executable).parent / "capsule"), "profile", "show",
                           "--profile", str(bob.path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CAPSULE_PIN": PIN})
    assert proc.returncode == 0, proc.stderr
    on_disk = Profile.load(bob.path, PIN)
    assert set(on_disk.session_keys()) == {current.record.sid}
    assert on_disk.destroyed_sessions() == {old.record.sid}
    assert current.record.sid.hex() in proc.stdout and old.record.sid.hex() not in proc.stdout
    assert f"expires {current.record.expires}" in proc.stdout
    destroy = core.utc_timestamp(dt.datetime.fromtimestamp(
        current.expires + alg.SESSION_RETENTION_S, dt.UTC))
    assert f"destroyed after {destroy}" in proc.stdout
    assert base64.b64encode(current.private.private_bytes_raw()).decode() not in proc.stdout
