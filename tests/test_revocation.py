"""Revocation on by default, and fresh (issue 9 part 4), plugin side and without a server.

Bots here are real slixmpp clients with the real plugin and real profiles from a real CA; only
the certificate directory is a fake (``ServedCertificates``: what a possibly hostile server
serves from PEP), and nothing is connected: a stanza that would have gone out shows up as
slixmpp's ``stanza_not_sent`` event.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from slixmpp import JID, ClientXMPP

import capsule
from capsule import enrollment
from capsule import stanza as st
from capsule.errors import RevocationUnknown, RevokedCertificate, StaleCrl
from capsule.plugin import CapsuleFailure
from capsule.profile import Profile
from capsule.testing.identities import enroll
from capsule.trust import CertificateSource, CertPair
from capsule_ca import Authority

from .helpers import PIN, capsule_of


class ServedCertificates(CertificateSource):
    """A fake of PEP: serves whatever bundle the test (playing the server) put there."""

    def __init__(self) -> None:
        self.bundles: dict[str, CertPair] = {}

    def serve(self, profile: Profile) -> None:
        data = profile.data
        assert data.signing_cert and data.encryption_cert
        self.bundles[data.jid] = CertPair(data.signing_cert.encode(),
                                            data.encryption_cert.encode())

    async def fetch(self, jid: str) -> CertPair | None:
        return self.bundles.get(jid)


def bot(profile: Profile, served: ServedCertificates, **config: Any) -> ClientXMPP:
    client = ClientXMPP(profile.data.jid, "not used: never connected")
    client.register_plugin("capsule", {"profile": str(profile.path), "pin": PIN,
                                       "allow_insecure": True, "publish": False,
                                       "source": served, **config}, module=capsule)
    return client


def expired_crl(authority: Authority, passphrase: bytes = b"unit passphrase") -> bytes:
    """A CRL our CA really signed, newer than any it issued, whose nextUpdate passed long ago
    (what a server withholding the CA's updates leaves a client with)."""
    key = serialization.load_pem_private_key(
        (authority.dir / "private/root.key").read_bytes(), passphrase)
    assert isinstance(key, rsa.RSAPrivateKey)
    root = x509.load_pem_x509_certificate(authority.root_pem)
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(root.subject)
           .last_update(now - dt.timedelta(days=400)).next_update(now - dt.timedelta(days=393))
           .add_extension(x509.CRLNumber(10**9), critical=False)
           .sign(key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def people(authority: Authority, tmp_path: Path) -> Callable[..., Profile]:
    def make(name: str, crl: bytes | None = b"current", path: str | None = None) -> Profile:
        profile = enroll(authority, tmp_path / (path or f"{name}.capsule"),
                         f"{name}@capsule.test", PIN)
        if crl != b"current":
            profile.data.crl = None
            if crl is not None:
                assert enrollment.store_crl(profile, crl)
            profile.save()
        return profile

    return make


async def capsule_from(sender: ClientXMPP, to: str, body: str) -> Any:
    msg = sender.make_message(mto=JID(to), mbody=body, mtype="chat", mfrom=sender.boundjid)
    return await capsule_of(sender).encrypt_message(msg)


@pytest.mark.parametrize(("crl", "reason"), [(None, "revocation-unknown"),
                                             ("expired", "stale-crl")])
async def test_without_a_fresh_crl_nothing_is_sealed_or_accepted(
        authority: Authority, people: Callable[..., Profile], crl: str | None, reason: str
        ) -> None:
    served = ServedCertificates()
    alice = people("alice", crl=expired_crl(authority) if crl else None)
    bob = people("bob")
    served.serve(alice)
    served.serve(bob)
    alice_bot, bob_bot = bot(alice, served), bot(bob, served)  # default config: policy prefer
    with pytest.raises(RevocationUnknown) as refused:
        await capsule_of(alice_bot).send("bob@capsule.test", "to bob")
    assert refused.value.reason == reason
    assert isinstance(refused.value, StaleCrl) == (reason == "stale-crl")
    # bob (fresh CRL) can seal to alice, but alice cannot tell whether bob is revoked
    incoming = await capsule_from(bob_bot, "alice@capsule.test", "to alice")
    with pytest.raises(RevocationUnknown) as refused:
        await capsule_of(alice_bot).open(incoming)
    assert refused.value.reason == reason


async def test_prefer_refuses_with_an_event_instead_of_plaintext(
        authority: Authority, people: Callable[..., Profile]) -> None:
    served = ServedCertificates()
    alice, bob = people("alice", crl=expired_crl(authority)), people("bob")
    served.serve(bob)
    alice_bot = bot(alice, served, policy="prefer")
    failures: asyncio.Queue[CapsuleFailure] = asyncio.Queue()
    leaked: list[Any] = []
    alice_bot.add_event_handler("capsule_error", failures.put_nowait)
    alice_bot.add_event_handler("stanza_not_sent", leaked.append)
    msg = alice_bot.make_message(mto=JID("bob@capsule.test"), mbody="secret", mtype="chat")
    # what the stream does with an outgoing stanza: run the out filters
    assert capsule_of(alice_bot)._filter_out(msg) is None
    failure = await asyncio.wait_for(failures.get(), 10)
    assert failure.reason == "stale-crl" and failure.peer == "bob@capsule.test"
    assert "secret" not in failure.message
    await asyncio.sleep(0.2)
    assert leaked == []


async def test_superseded_certificates_served_by_a_hostile_server_are_refused(
        people: Callable[..., Profile]) -> None:
    """The server keeps serving bob's old (superseded, hence revoked) certificates; alice, with
    nothing configured, uses the CRL stored at her enrollment and refuses them."""
    served = ServedCertificates()
    old_bob = people("bob")
    people("bob", path="bob-new.capsule")  # bob enrolls again: the old certificates superseded
    served.serve(old_bob)
    alice = people("alice")
    served.serve(alice)
    alice_bot = bot(alice, served)
    with pytest.raises(RevokedCertificate) as refused:
        await capsule_of(alice_bot).send("bob@capsule.test", "to the old key?")
    assert refused.value.reason == "revoked"
    old_bob_bot = bot(old_bob, served)  # the thief of bob's old profile signs with it
    incoming = await capsule_from(old_bob_bot, "alice@capsule.test", "from the old key")
    with pytest.raises(RevokedCertificate):
        await capsule_of(alice_bot).open(incoming)


def test_import_cert_takes_the_crl_and_refuses_another_cas(
        authority: Authority, people: Callable[..., Profile], tmp_path: Path) -> None:
    profile = people("carol", crl=None)
    exe = Path(sys.executable).with_name("capsule")

    def import_cert(*files: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(exe), "profile", "import-cert", "--profile", str(profile.path),
                               *map(str, files)], capture_output=True, text=True, check=False,
                              env={"CAPSULE_PIN": PIN, "PATH": "/usr/bin:/bin"})

    other = Authority.init(tmp_path / "other-ca", "Other CA", b"other passphrase")
    refused = import_cert(other.crl_path)
    assert refused.returncode == 1 and "not signed by our CA" in refused.stderr
    assert Profile.load(profile.path, PIN).data.crl is None
    done = import_cert(authority.crl_path)
    assert done.returncode == 0, done.stderr
    assert "stored as the CA's CRL" in done.stdout
    assert Profile.load(profile.path, PIN).data.crl == authority.crl_path.read_text()


async def test_a_missing_crl_is_fetched_before_refusing(
        authority: Authority, people: Callable[..., Profile], tmp_path: Path) -> None:
    """A bot that has no CRL looks for one (its `crl` file here; the CA service likewise) before
    it refuses, and seals once it has it."""
    served = ServedCertificates()
    alice, bob = people("alice", crl=None), people("bob")
    served.serve(bob)
    crl_file = tmp_path / "crl.pem"
    alice_bot = bot(alice, served, crl=str(crl_file))  # the file is not there yet
    with pytest.raises(RevocationUnknown):
        await capsule_of(alice_bot).send("bob@capsule.test", "too early")
    crl_file.write_bytes(authority.crl_path.read_bytes())
    sealed = await capsule_from(alice_bot, "bob@capsule.test", "now-sealed")
    assert st.has_capsule(sealed) and "now-sealed" not in str(sealed)
