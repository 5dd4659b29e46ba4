"""Bot to bot over real ejabberd and Prosody (with MariaDB, TLS from our CA, real slixmpp).

Every plaintext used here comes from ``secret()``; after each test the DEBUG log captured
during it is searched for those plaintexts and for the bots' PIN: neither may appear.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from typing import Any

import pytest
from slixmpp import JID, ClientXMPP, Message

from capsule import capsule_info, core, discovery, envelope
from capsule import namespaces as ns
from capsule import stanza as st
from capsule.errors import NoCertificate, RevokedCertificate, UntrustedCertificate
from capsule.testing.identities import enroll
from capsule.testing.inbox import Inbox
from capsule_ca import Authority
from capsule_stack.rows import wait_stored

from .helpers import BOT_PIN, assert_ciphertext_only, secret, tamper, verified_sender

pytestmark = pytest.mark.usefixtures("no_plaintext_in_debug_log")


async def test_round_trip_and_server_stores_only_ciphertext(xmpp_stack, capsule_bot):
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    inbox = Inbox(bob.client)
    text = secret("meet at dawn")
    await alice.capsule.send(bob.jid, text)
    msg = await inbox.message()
    assert msg["body"] == text
    info = capsule_info(msg)
    assert info is not None and info.encrypted and info.sender == alice.jid
    assert info.sender_cert.jid == alice.jid
    for user in (alice.account.user, bob.account.user):
        await wait_stored(xmpp_stack, "archive", user)
        rows = assert_ciphertext_only(xmpp_stack, user, [text])
        assert all("urn:capsule:" in row for row in rows)


async def test_transparent_reply_and_several_recipients(capsule_bot):
    alice, bob, carol = [await capsule_bot(n) for n in ("alice", "bob", "carol")]
    inboxes = {b.jid: Inbox(b.client) for b in (alice, bob, carol)}
    text = secret("to both")
    await alice.capsule.send([bob.jid, carol.jid], text)
    for bot in (bob, carol):
        msg = await inboxes[bot.jid].message()
        assert msg["body"] == text and capsule_info(msg) is not None
    # an ordinary reply goes out encrypted by the outgoing filter
    reply = secret("reply")
    msg.reply(reply).send()
    back = await inboxes[alice.jid].message()
    assert back["body"] == reply and verified_sender(back) == carol.jid


async def test_offline_capsules_survive_restart_in_order(xmpp_stack, capsule_bot):
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    await bob.client.disconnect(wait=1)
    texts = [secret(f"offline {i}") for i in range(3)]
    for text in texts:
        await alice.capsule.send(bob.jid, text)
    await wait_stored(xmpp_stack, "offline", bob.account.user, at_least=3)
    assert_ciphertext_only(xmpp_stack, bob.account.user, texts, "offline")
    await alice.client.disconnect(wait=1)
    await asyncio.to_thread(xmpp_stack.restart_server)
    client = ClientXMPP(bob.jid, bob.account.password)
    inbox = Inbox(client)
    await capsule_bot("bob", account=bob.account, profile=bob.profile, client=client)
    assert [(await inbox.message())["body"] for _ in texts] == texts
    await inbox.nothing(0.5)


@pytest.mark.parametrize("part", ["payload", "wrapped key", "signature", "header"])
async def test_tampered_stored_capsule_is_rejected(xmpp_stack, capsule_bot, part):
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    await bob.client.disconnect(wait=1)
    text = secret("tamper me")
    await alice.capsule.send(bob.jid, text)
    (row,) = await wait_stored(xmpp_stack, "offline", bob.account.user)
    old, new = tamper(part, row)
    xmpp_stack.replace_stored("offline", bob.account.user, old, new)
    client = ClientXMPP(bob.jid, bob.account.password)
    inbox = Inbox(client)
    await capsule_bot("bob", account=bob.account, profile=bob.profile, client=client)
    failure = await inbox.error()
    assert failure.reason == "bad-signature" and failure.peer == alice.jid
    await inbox.nothing()


async def test_forwarded_capsule_is_rejected(capsule_bot):
    alice, bob, carol = [await capsule_bot(n) for n in ("alice", "bob", "carol")]
    inbox = Inbox(carol.client)
    # refused on the cheap check (signed by alice, sent by bob) before any look-up or key use
    for recipients, reason in (([bob.jid], "envelope-mismatch"), ([bob.jid, carol.jid], "envelope-mismatch")):
        msg = alice.client.make_message(mto=bob.jid, mbody=secret("for bob"), mtype="chat")
        capsule_msg = await alice.capsule.encrypt_message(msg, recipients)
        capsule_msg["to"] = carol.jid  # bob passes it on as if it were his
        capsule_msg["from"] = bob.client.boundjid
        bob.client.send_raw(str(capsule_msg))
        assert (await inbox.error()).reason == reason
    await inbox.nothing(0.5)


@pytest.mark.parametrize("case", ["expired", "revoked", "other CA", "SAN mismatch"])
async def test_bad_recipient_certificates_are_refused(xmpp_stack, capsule_bot, connect, new_account,
                                                      tmp_path, case):
    alice = await capsule_bot("alice", crl=str(xmpp_stack.authority().crl_path))
    ca = xmpp_stack.authority()
    now = dt.datetime.now(dt.UTC)
    account = new_account("bob")
    client = await connect(account)
    client.register_plugin("xep_0060")
    jid = account.jid
    if case == "expired":
        prof = enroll(ca, tmp_path / "b.capsule", jid, BOT_PIN, not_before=now - dt.timedelta(days=9),
                      not_after=now - dt.timedelta(days=1))
    elif case == "revoked":
        prof = enroll(ca, tmp_path / "b.capsule", jid, BOT_PIN)
        ca.revoke(jid=jid)
        alice.capsule.refresh_crl()
    elif case == "other CA":
        other = Authority.init(tmp_path / "other", "Other CA", b"other passphrase")
        prof = enroll(other, tmp_path / "b.capsule", jid, BOT_PIN)
    else:
        prof = enroll(ca, tmp_path / "b.capsule", "someone-else@" + jid.split("@")[1], BOT_PIN)
    data = prof.data
    assert data.signing_cert and data.encryption_cert
    await discovery.publish(client, {"sign": data.signing_cert, "encrypt": data.encryption_cert})
    expected = {"expired": (UntrustedCertificate, "expired on"),
                "revoked": (RevokedCertificate, "is revoked"),
                "other CA": (UntrustedCertificate, "not issued by our CA"),
                "SAN mismatch": (UntrustedCertificate, "is for someone-else@")}[case]
    with pytest.raises(expected[0], match=expected[1]):
        await alice.capsule.send(jid, secret("never sent"))


async def test_capsule_signed_by_foreign_ca_is_rejected(capsule_bot, connect, new_account, tmp_path):
    bob = await capsule_bot("bob")
    inbox = Inbox(bob.client)
    account = new_account("mallory")
    mallory = await connect(account)
    mallory.register_plugin("xep_0060")
    other = Authority.init(tmp_path / "other", "Other CA", b"other passphrase")
    forged = enroll(other, tmp_path / "m.capsule", account.jid, BOT_PIN)
    data = forged.data
    assert data.signing_cert and data.encryption_cert
    await discovery.publish(mallory, {"sign": data.signing_cert, "encrypt": data.encryption_cert})
    bob_enc = bob.capsule.own_encrypt
    env = envelope.encode([], account.jid, [bob.jid], core.utc_timestamp())
    sealed = core.seal(env, sender=account.jid, sender_cert="00" * 32,
                       signing_key=data.signing_key,
                       recipients=[core.Recipient(bob.jid, bob_enc.fingerprint, bob_enc.public_key)])
    msg = mallory.make_message(mto=bob.jid, mtype="chat")
    st.from_core(msg, sealed)
    msg.send()
    failure = await inbox.error()
    assert failure.reason == "untrusted" and "not issued by our CA" in failure.message
    await inbox.nothing(0.5)


async def test_policy_require(capsule_bot, connect, new_account, xmpp_stack):
    alice = await capsule_bot("alice", policy="require")
    errors = Inbox(alice.client)
    plain_account = new_account("plain")
    plain = await connect(plain_account)
    received = Inbox(plain)
    with pytest.raises(NoCertificate, match="has published no Capsule certificates"):
        await alice.capsule.send(plain_account.jid, secret("explicit"))
    text = secret("transparent")
    alice.client.send_message(mto=plain_account.jid, mbody=text, mtype="chat")
    failure = await errors.error()
    assert failure.reason == "no-certificate"
    await received.nothing()
    assert not any(text in row for row in xmpp_stack.stored("archive", alice.account.user))
    # and incoming plaintext is refused
    plain.send_message(mto=alice.jid, mbody="hello in clear", mtype="chat")
    failure = await errors.error()
    assert failure.reason == "policy" and failure.peer == plain_account.jid
    await errors.nothing(0.5)


async def test_a_node_set_to_drop_our_certificates_offline_is_restored_at_login(
        xmpp_stack, capsule_bot, connect):
    """Another client of the account sets our certificates node to drop its item whenever we
    go offline (ejabberd's pubsub#purge_offline) and open to any publisher: then contacts find
    no certificates while the bot is away. Its next login puts the node back, so a new contact
    reaches it offline (Prosody has no such option and keeps the item either way)."""
    alice = await capsule_bot("alice")
    other = ClientXMPP(f"{alice.jid}/other", alice.account.password)
    other.register_plugin("xep_0060")
    await connect(alice.account, client=other)
    form = other.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden", value=discovery.NODE_CONFIG_FORM)
    form.add_field(var="pubsub#purge_offline", value="1")
    form.add_field(var="pubsub#publish_model", value="open")
    await other.plugin["xep_0060"].set_node_config(None, ns.CERTS_NODE, form)
    for client in (other, alice.client):
        await client.disconnect(wait=1)
    bob = await capsule_bot("bob")
    if xmpp_stack.info.server == "ejabberd":  # the attack worked: the item went with us
        with pytest.raises(NoCertificate):
            await bob.capsule.contact(alice.jid)
    alice = await capsule_bot("alice", account=alice.account, profile=alice.profile)
    await alice.client.disconnect(wait=1)
    carol = await capsule_bot("carol", policy="require")  # has never seen alice's certificates
    await carol.capsule.send(alice.jid, secret("found while alice is offline"))
    assert alice.jid in carol.capsule.store.data.contacts


class EchoBot(ClientXMPP):
    """A bot written in plain slixmpp style; it knows nothing of Capsule."""

    def __init__(self, jid: str, password: str):
        super().__init__(jid, password)
        self.add_event_handler("message", self.echo)

    def echo(self, msg: Message) -> None:
        if msg["type"] in ("chat", "normal"):
            msg.reply("echo: " + msg["body"]).send()


async def test_existing_echo_bot_gains_encryption_with_one_line(xmpp_stack, capsule_bot, new_account):
    alice = await capsule_bot("alice")
    account = new_account("echo")
    echo = EchoBot(account.jid, account.password)  # the only Capsule line is the register_plugin
    await capsule_bot("echo", account=account, client=echo)  # done inside the fixture
    inbox = Inbox(alice.client)
    text = secret("ping")
    await alice.capsule.send(account.jid, text)
    answer = await inbox.message()
    assert answer["body"] == "echo: " + text and capsule_info(answer) is not None
    await wait_stored(xmpp_stack, "archive", account.user, at_least=2)
    assert_ciphertext_only(xmpp_stack, account.user, [text])


async def test_history_from_mam_decrypts_sent_and_received(xmpp_stack, capsule_bot):
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    inbox = Inbox(bob.client)
    sent = [secret("history one"), secret("history two")]
    for text in sent:
        await alice.capsule.send(bob.jid, text)
        await inbox.message()
    reply = secret("history reply")
    await bob.capsule.send(alice.jid, reply)
    await wait_stored(xmpp_stack, "archive", alice.account.user, at_least=3)
    history = await alice.capsule.history(with_jid=bob.jid)
    assert [m["body"] for m in history] == [*sent, reply]
    assert [verified_sender(m) for m in history] == [alice.jid, alice.jid, bob.jid]


async def test_changed_certificate_validates_and_is_reported(xmpp_stack, capsule_bot, tmp_path):
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    changes: asyncio.Queue[Any] = asyncio.Queue()
    alice.client.add_event_handler("capsule_cert_changed", changes.put_nowait)
    await alice.capsule.send(bob.jid, secret("first"))  # pins bob
    await bob.client.disconnect(wait=1)
    new_profile = tmp_path / "bob-new.capsule"
    enroll(xmpp_stack.authority(), new_profile, bob.jid, BOT_PIN)  # --replace revokes the old
    client = ClientXMPP(bob.jid, bob.account.password)
    inbox = Inbox(client)
    bob = await capsule_bot("bob", account=bob.account, profile=new_profile, client=client)
    alice_inbox = Inbox(alice.client)
    text = secret("signed with the new key")
    await bob.capsule.send(alice.jid, text)
    change = await asyncio.wait_for(changes.get(), 15)
    assert change["jid"] == bob.jid
    assert (await alice_inbox.message())["body"] == text
    text = secret("to the new key")
    await alice.capsule.send(bob.jid, text)
    assert (await inbox.message())["body"] == text


async def test_carbons_let_other_resources_read_both_directions(capsule_bot, tmp_path):
    alice = await capsule_bot("alice", carbons=True)
    twin_profile = tmp_path / "alice-tablet.capsule"
    twin_profile.write_bytes(alice.profile.read_bytes())  # the same keys on her second device
    tablet = await capsule_bot("alice", account=alice.account, profile=twin_profile, carbons=True)
    bob = await capsule_bot("bob")  # carbons were enabled before the bots published
    sent_copies: asyncio.Queue[Message] = asyncio.Queue()
    tablet.client.add_event_handler("capsule_carbon_sent", sent_copies.put_nowait)
    text = secret("from the phone")
    await alice.capsule.send(bob.jid, text)
    copy = await asyncio.wait_for(sent_copies.get(), 15)
    assert copy["body"] == text and verified_sender(copy) == alice.jid
    phone, pad = Inbox(alice.client), Inbox(tablet.client)
    reply = secret("to every device")
    await bob.capsule.send(alice.jid, reply)  # bare JID: one resource gets it, the other a carbon
    assert (await phone.message())["body"] == reply
    assert (await pad.message())["body"] == reply


async def test_group_chat_in_a_non_anonymous_room(xmpp_stack, capsule_bot, connect, new_account):
    alice, bob, carol = [await capsule_bot(n) for n in ("alice", "bob", "carol")]
    room = JID(f"capsule-{secrets.token_hex(4)}@conference.{xmpp_stack.info.domain}")
    muc = alice.client.plugin["xep_0045"]
    await muc.join_muc_wait(room, "alice", maxchars=0)
    form = await muc.get_room_config(room)
    form["type"] = "submit"
    form.set_values({"muc#roomconfig_whois": "anyone"})  # non-anonymous (ejabberd default too)
    await muc.set_room_config(room, form)
    for bot, nick in ((bob, "bob"), (carol, "carol")):
        await bot.client.plugin["xep_0045"].join_muc_wait(room, nick, maxchars=0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    while sorted(alice.capsule.occupants(str(room))) != sorted([alice.jid, bob.jid, carol.jid]):
        assert loop.time() - began < 10, "occupants not seen"
        await asyncio.sleep(0.1)
    inboxes = {b.jid: Inbox(b.client) for b in (alice, bob, carol)}
    text = secret("to the whole room")
    await alice.capsule.send_groupchat(room, text)
    for jid, inbox in inboxes.items():  # alice too: the room reflects her message
        msg = await inbox.message()
        assert msg["type"] == "groupchat" and msg["body"] == text, jid
        assert verified_sender(msg) == alice.jid and msg["from"] == JID(f"{room}/alice")
    # an ordinary groupchat send_message is sealed by the outgoing filter
    reply = secret("reply to the room")
    bob.client.send_message(mto=room, mbody=reply, mtype="groupchat")
    for inbox in inboxes.values():
        assert (await inbox.message())["body"] == reply
    # an occupant who speaks in plaintext is refused by a bot requiring encryption
    strict = await capsule_bot("dave", policy="require")
    await strict.client.plugin["xep_0045"].join_muc_wait(room, "dave", maxchars=0)
    plain_acc = new_account("erin")
    plain = await connect(plain_acc)
    plain.register_plugin("xep_0045")
    await plain.plugin["xep_0045"].join_muc_wait(room, "erin", maxchars=0)
    errors = Inbox(strict.client)
    plain.send_message(mto=room, mbody="hello in clear", mtype="groupchat")
    failure = await errors.error()
    assert failure.reason == "policy"
    # erin has no certificate: nobody can seal for the whole room any more
    with pytest.raises(NoCertificate, match=plain_acc.jid):
        await alice.capsule.send_groupchat(room, secret("never sent"))
