"""The CA as an XMPP service, bot to bot over ejabberd and Prosody: enrollment from empty
profiles, refusals, revocation reaching clients, rotation, and a service that keeps serving."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from slixmpp import ClientXMPP

from capsule import core, discovery, enrollment
from capsule.cli import main as capsule_main
from capsule.connection import login
from capsule.errors import RevokedCertificate
from capsule.profile import FAST_KDF, Profile
from capsule.testing.inbox import Inbox
from capsule_ca.service import EnrollmentService
from capsule_stack.rows import wait_stored

from .helpers import BOT_PIN


@pytest_asyncio.fixture
async def ca_service(xmpp_stack, new_account) -> AsyncIterator[EnrollmentService]:
    account = new_account("ca")
    state = xmpp_stack.info
    service = EnrollmentService(account.jid, account.password, xmpp_stack.authority(),
                                "127.0.0.1", state.c2s_port, state.ca_root, crl_poll=0.5)
    await service.start()
    yield service
    await service.stop()


async def plain_client(xmpp_stack, account) -> ClientXMPP:
    client = ClientXMPP(account.jid, account.password)
    client.register_plugin("xep_0060")
    await login(client, "127.0.0.1", xmpp_stack.info.c2s_port, xmpp_stack.info.ca_root)
    return client


async def enroll_new(xmpp_stack, ca_service, account, tmp_path: Path) -> Path:
    """Empty profile -> enrolled and published, through the service (root pinned on first use)."""
    path = tmp_path / f"{account.user}.capsule"
    profile = Profile.create(path, account.jid, BOT_PIN, kdf=FAST_KDF, short_pin=True)
    client = await plain_client(xmpp_stack, account)
    seen: list[str] = []

    def pin_root(fingerprint: str) -> bool:
        seen.append(fingerprint)
        return True

    await enrollment.enroll_profile(client, profile, ca_service.boundjid.bare, None, pin_root)
    await client.disconnect()
    assert seen == [core.pem_fingerprint(xmpp_stack.authority().root_pem)]
    return path


async def test_three_bots_enroll_from_nothing_and_talk(xmpp_stack, ca_service, new_account,
                                                       capsule_bot, tmp_path, monkeypatch):
    accounts = [new_account(n) for n in ("alice", "bob", "carol")]
    profiles = [await enroll_new(xmpp_stack, ca_service, a, tmp_path) for a in accounts[:2]]
    # carol uses the command line: `capsule enroll --register` creates her account in-band
    # (XEP-0077), then the profile, then enrolls it
    carol_profile = tmp_path / "carol.capsule"
    password = tmp_path / "carol-password"
    password.write_text(accounts[2].password)
    xmpp_stack.deluser(accounts[2].user)  # not provisioned: she registers herself
    monkeypatch.setenv("CAPSULE_PIN", BOT_PIN)
    code = await asyncio.to_thread(capsule_main, [
        "enroll", "--register", "--short-pin", "--profile", str(carol_profile),
        "--jid", accounts[2].jid,
        "--ca", ca_service.boundjid.bare, "--ca-cert", str(xmpp_stack.info.ca_root),
        "--password-file", str(password), "--port", str(xmpp_stack.info.c2s_port)])
    assert code == 0
    stored = Profile.load(carol_profile, BOT_PIN).data  # revocation on by default from here
    assert stored.ca_service == ca_service.boundjid.bare and stored.crl
    profiles.append(carol_profile)
    bots = [await capsule_bot(a.user, account=a, profile=p) for a, p in zip(accounts, profiles,
                                                                              strict=True)]
    inboxes = [Inbox(b.client) for b in bots]
    for i, bot in enumerate(bots):
        peer = (i + 1) % 3
        await bot.capsule.send(bots[peer].jid, f"hello from {bot.account.user}")
        msg = await inboxes[peer].message()
        assert msg["body"] == f"hello from {bot.account.user}"
    log = (Path(xmpp_stack.info.ca_dir) / "issuance.log").read_text()
    assert all(f"{a.jid}\tissued sign" in log for a in accounts)


async def test_nobody_gets_a_certificate_for_someone_else(xmpp_stack, ca_service, new_account,
                                                         tmp_path):
    alice, mallory = new_account("alice"), new_account("mallory")
    client = await plain_client(xmpp_stack, mallory)
    ca = ca_service.boundjid.bare
    # a CSR naming alice, sent by mallory
    stolen = Profile.create(tmp_path / "x.capsule", alice.jid, BOT_PIN, kdf=FAST_KDF, short_pin=True)
    with pytest.raises(enrollment.EnrollmentError, match=f"asks for {alice.jid}"):
        await enrollment.enroll(client, ca, {"sign": stolen.csr("sign"),
                                             "encrypt": stolen.csr("encrypt")})
    # mallory's own CSRs, but asking the CA to issue them for alice
    own = Profile.create(tmp_path / "m.capsule", mallory.jid, BOT_PIN, kdf=FAST_KDF, short_pin=True)
    iq = client.make_iq_set(ito=enrollment.service_jid(ca))
    iq["capsule_enroll"]["jid"] = alice.jid
    for usage in ("sign", "encrypt"):
        csr = enrollment.Csr()
        csr["usage"], csr["value"] = usage, own.csr(usage).decode()
        iq["capsule_enroll"].append(csr)
    with pytest.raises(enrollment.EnrollmentError, match="may enroll only itself"):
        await enrollment._ask(client, iq, 15)
    assert xmpp_stack.authority().valid_for(alice.jid) == []
    assert await enrollment.lookup(client, ca, alice.jid) is None
    await client.disconnect()


async def test_revocation_reaches_clients_within_the_refresh_bound(
        xmpp_stack, ca_service, new_account, capsule_bot, tmp_path):
    alice_acc, bob_acc = new_account("alice"), new_account("bob")
    paths = [await enroll_new(xmpp_stack, ca_service, a, tmp_path) for a in (alice_acc, bob_acc)]
    refresh = 2
    alice = await capsule_bot("alice", account=alice_acc, profile=paths[0],
                              ca_service=ca_service.boundjid.bare, crl_refresh=refresh)
    bob = await capsule_bot("bob", account=bob_acc, profile=paths[1])
    inbox = Inbox(alice.client)
    await alice.capsule.send(bob.jid, "before revocation")
    await asyncio.to_thread(xmpp_stack.authority().revoke, None, bob.jid)  # capsule-ca revoke
    loop = asyncio.get_running_loop()
    began = loop.time()
    bob_serial = bob.capsule.own_sign.cert.serial_number
    # the documented bound: crl_refresh seconds (a PEP update usually comes sooner)
    while alice.capsule.trust.crl is None or alice.capsule.trust.crl.get_revoked_certificate_by_serial_number(
            bob_serial) is None:
        assert loop.time() - began < refresh + 5, "revocation not seen within the bound"
        await asyncio.sleep(0.2)
    with pytest.raises(RevokedCertificate, match="is revoked"):
        await alice.capsule.send(bob.jid, "after revocation")
    await bob.capsule.send(alice.jid, "signed with a revoked key")
    failure = await inbox.error()
    assert failure.reason == "revoked" and failure.peer == bob.jid
    await inbox.nothing(0.5)


async def test_rotation_keeps_history_readable(xmpp_stack, ca_service, new_account, capsule_bot,
                                               tmp_path, monkeypatch):
    alice_acc, bob_acc = new_account("alice"), new_account("bob")
    paths = [await enroll_new(xmpp_stack, ca_service, a, tmp_path) for a in (alice_acc, bob_acc)]
    alice = await capsule_bot("alice", account=alice_acc, profile=paths[0])
    bob = await capsule_bot("bob", account=bob_acc, profile=paths[1])
    bob_inbox, alice_inbox = Inbox(bob.client), Inbox(alice.client)
    await alice.capsule.send(bob.jid, "old key: one")
    await bob_inbox.message()
    await bob.capsule.send(alice.jid, "old key: reply")
    await alice_inbox.message()
    await alice.client.disconnect(wait=1)
    password = tmp_path / "alice-password"
    password.write_text(alice_acc.password)
    monkeypatch.setenv("CAPSULE_PIN", BOT_PIN)
    assert await asyncio.to_thread(capsule_main, [
        "rotate", "--profile", str(paths[0]), "--ca", ca_service.boundjid.bare,
        "--password-file", str(password), "--port", str(xmpp_stack.info.c2s_port)]) == 0
    changes: asyncio.Queue[Any] = asyncio.Queue()
    bob.client.add_event_handler("capsule_cert_changed", changes.put_nowait)
    alice = await capsule_bot("alice", account=alice_acc, profile=paths[0])
    await alice.capsule.send(bob.jid, "new key: two")
    assert (await bob_inbox.message())["body"] == "new key: two"
    assert (await asyncio.wait_for(changes.get(), 10))["jid"] == alice.jid
    await wait_stored(xmpp_stack, "archive", alice_acc.user, at_least=3)
    history = await alice.capsule.history(with_jid=bob.jid)
    assert [m["body"] for m in history] == ["old key: one", "old key: reply", "new key: two"]


async def test_service_survives_restart_and_malformed_requests(xmpp_stack, ca_service,
                                                               new_account, tmp_path):
    account = new_account("dave")
    client = await plain_client(xmpp_stack, account)
    ca = ca_service.boundjid.bare
    bad = client.make_iq_set(ito=enrollment.service_jid(ca))
    csr = enrollment.Csr()
    csr["usage"], csr["value"] = "sign", "not a certificate request"
    bad["capsule_enroll"].append(csr)
    with pytest.raises(enrollment.EnrollmentError, match="one <csr usage='sign'/>"):
        await enrollment._ask(client, bad, 15)
    bad = client.make_iq_set(ito=enrollment.service_jid(ca))
    for usage in ("sign", "encrypt"):
        csr = enrollment.Csr()
        csr["usage"], csr["value"] = usage, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
        bad["capsule_enroll"].append(csr)
    with pytest.raises(enrollment.EnrollmentError, match="not a PEM certificate request"):
        await enrollment._ask(client, bad, 15)
    assert b"BEGIN X509 CRL" in await enrollment.fetch_crl(client, ca)  # still serving
    await client.disconnect()
    await asyncio.to_thread(xmpp_stack.restart_server)
    loop = asyncio.get_running_loop()
    began = loop.time()
    while not ca_service.is_connected() or not ca_service.sessionstarted:
        assert loop.time() - began < 30, "the CA service did not reconnect"
        await asyncio.sleep(0.2)
    client = await plain_client(xmpp_stack, account)
    path = await enroll_new(xmpp_stack, ca_service, account, tmp_path)
    assert Profile.load(path, BOT_PIN).ready()
    await client.disconnect()


async def test_enrollment_keeps_revocation_fresh_with_nothing_configured(
        xmpp_stack, ca_service, new_account, capsule_bot, tmp_path):
    """The CRL and the service's JID stored at enrollment keep a default-configured bot's CRL
    fresh: `serve` renews a CRL at half-life, and the bot refuses bob's superseded certificates
    that the server keeps serving."""
    authority = xmpp_stack.authority()
    await asyncio.to_thread(authority.gencrl, dt.timedelta(seconds=6))  # about to expire
    alice_acc, bob_acc = new_account("alice"), new_account("bob")
    alice_path = await enroll_new(xmpp_stack, ca_service, alice_acc, tmp_path)
    stored = Profile.load(alice_path, BOT_PIN).data
    assert stored.ca_service == ca_service.boundjid.bare and stored.crl
    old_bob = await enroll_new(xmpp_stack, ca_service, bob_acc, tmp_path)
    old_bob = old_bob.rename(tmp_path / "bob-old.capsule")
    await enroll_new(xmpp_stack, ca_service, bob_acc, tmp_path)  # supersedes the old ones
    loop = asyncio.get_running_loop()
    began = loop.time()
    while authority.crl_needs_renewal():
        assert loop.time() - began < 30, "`capsule-ca serve` did not renew the CRL"
        await asyncio.sleep(0.2)
    # the server serves bob's old certificates again
    client = await plain_client(xmpp_stack, bob_acc)
    old = Profile.load(old_bob, BOT_PIN).data
    assert old.signing_cert and old.encryption_cert and old.ca_root
    await discovery.publish(client, {"sign": old.signing_cert, "encrypt": old.encryption_cert,
                                     "ca": old.ca_root})
    await client.disconnect()
    alice = await capsule_bot("alice", account=alice_acc, profile=alice_path)  # nothing configured
    next_update = alice.capsule.trust.crl.next_update_utc
    assert next_update - dt.datetime.now(dt.UTC) > dt.timedelta(days=1)  # the renewed CRL
    with pytest.raises(RevokedCertificate):
        await alice.capsule.send(bob_acc.jid, "to bob's old key?")
    inbox = Inbox(alice.client)
    alice.client.send_message(mto=bob_acc.jid, mbody="transparent, policy prefer")
    failure = await inbox.error()
    assert failure.reason == "revoked" and failure.peer == bob_acc.jid
