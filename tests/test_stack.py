"""The private stack: TLS verified against our CA, offline messages across a restart, clear
login failures, and a lifecycle that never leaves or kills processes it does not own."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import ssl

import pytest
from slixmpp import ClientXMPP, Message

from capsule.connection import LoginError, login
from capsule.errors import ProfileError
from capsule.plugin import attach
from capsule.testing.identities import enroll
from capsule_stack.processes import pid_alive, wait_for
from capsule_stack.rows import wait_stored
from capsule_stack.stack import Stack


async def test_login_verifies_server_certificate_against_our_ca(xmpp_stack, new_account, connect):
    alice = new_account("alice")
    client = await connect(alice)
    cert = client.transport.get_extra_info("ssl_object").getpeercert()
    sans = [value for kind, value in cert["subjectAltName"] if kind == "DNS"]
    assert xmpp_stack.info.domain in sans


async def test_server_certificate_rejected_without_our_ca(xmpp_stack, new_account):
    alice = new_account("alice")
    client = ClientXMPP(alice.jid, alice.password)
    state = xmpp_stack.info
    # the system trust store does not know our CA
    client.ssl_context = ssl.create_default_context()
    client.enable_direct_tls = False
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    client.add_event_handler("ssl_invalid_chain", lambda _e: None if outcome.done() else
                             outcome.set_result("invalid chain"))
    client.add_event_handler("session_start", lambda _e: None if outcome.done() else
                             outcome.set_result("session"))
    client.connect("127.0.0.1", state.c2s_port)
    try:
        assert await asyncio.wait_for(outcome, 20) == "invalid chain"
    finally:
        client.abort()


async def test_bad_password_fails_fast_with_clear_error(xmpp_stack, new_account):
    alice = new_account("alice")
    client = ClientXMPP(alice.jid, "not-" + alice.password)
    state = xmpp_stack.info
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(LoginError, match="authentication failed"):
        await login(client, "127.0.0.1", state.c2s_port, state.ca_root, timeout=20)
    assert loop.time() - began < 15  # an error, not the timeout


async def test_offline_message_survives_server_restart(xmpp_stack, new_account, connect):
    alice, bob = new_account("alice"), new_account("bob")
    sender = await connect(alice)
    sender.send_message(mto=bob.jid, mbody="kept while you were away", mtype="chat")
    await wait_stored(xmpp_stack, "offline", bob.user)  # stored before the restart
    await sender.disconnect(wait=1)
    await asyncio.to_thread(xmpp_stack.restart_server)

    receiver = ClientXMPP(bob.jid, bob.password)
    got: asyncio.Queue[str] = asyncio.Queue()
    receiver.add_event_handler("message", lambda msg: got.put_nowait(msg["body"]))
    await connect(bob, client=receiver)
    assert await asyncio.wait_for(got.get(), 15) == "kept while you were away"
    assert xmpp_stack.stored("offline", bob.user) == []  # delivered, so gone from the queue


def test_lifecycle_idempotent_start_stale_cleanup_and_stop(xmpp_stack, tmp_path):
    stack = Stack(tmp_path / "own", xmpp_stack.info.server, ca_dir=None)
    first = copy.deepcopy(stack.start())
    pids = dict(first.pids)
    assert stack.start().pids == pids  # starting a running stack is harmless
    markers = {"server": str(tmp_path / "own" / xmpp_stack.info.server),
               "mariadb": str(tmp_path / "own" / "mariadb")}
    os.kill(pids["server"], signal.SIGKILL)  # a crash leaves a stale stack
    assert wait_for(lambda: not pid_alive(pids["server"], markers["server"]), 10)
    assert pid_alive(pids["mariadb"], markers["mariadb"])
    again = Stack(tmp_path / "own", xmpp_stack.info.server).start()
    assert again.pids["server"] != pids["server"]
    assert not pid_alive(pids["mariadb"], markers["mariadb"])  # the stale one was cleaned
    # ports and credentials kept: clients configured for the stack reach it again
    assert (again.c2s_port, again.db_port, again.db_password, again.probe_password) == (
        first.c2s_port, first.db_port, first.db_password, first.probe_password)
    Stack(tmp_path / "own").stop()
    assert not any(pid_alive(pid, markers[name]) for name, pid in again.pids.items())
    kept = Stack(tmp_path / "own")
    assert kept.state is not None and kept.state.pids == {} and kept.running() == {}
    # the shared session stack was left alone
    assert all(xmpp_stack.running().values())


async def test_plugin_registered_on_a_client_already_logged_in(xmpp_stack, new_account, connect,
                                                               capsule_bot, tmp_path):
    """slixmpp calls session_bind before plugin_init then: the plugin checks the session and
    publishes at once (it raised AttributeError: 'store')."""
    account = new_account("late")
    client = await connect(account)
    foreign = tmp_path / "other.capsule"
    enroll(xmpp_stack.authority(), foreign, f"other@{xmpp_stack.info.domain}", "482916")
    with pytest.raises(ProfileError, match="profile is for other@"):
        attach(await connect(account), foreign, "482916")  # another resource of the account
    profile = tmp_path / "late.capsule"
    enroll(xmpp_stack.authority(), profile, account.jid, "482916")
    published = attach(client, profile, "482916")
    await published(30)
    got: asyncio.Queue[Message] = asyncio.Queue()
    client.add_event_handler("capsule_message", got.put_nowait)
    alice = await capsule_bot("alice")
    await alice.capsule.send(account.jid, "registered late, still encrypted")
    assert (await asyncio.wait_for(got.get(), 30))["body"] == "registered late, still encrypted"
