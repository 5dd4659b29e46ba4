"""ejabberd's WebAdmin in headless Chromium: the queued capsule shows as ciphertext only."""

from __future__ import annotations

import asyncio
import re

import pytest

from capsule.cli import main as capsule_main
from capsule.panel import check_ejabberd_queue
from capsule.testing.stack import wait_stored


@pytest.mark.parametrize("xmpp_stack", ["ejabberd"], indirect=True)  # Prosody has no web admin
async def test_webadmin_offline_queue_shows_ciphertext_only(xmpp_stack, capsule_bot, new_account,
                                                            connect, tmp_path):
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    await bob.client.disconnect(wait=1)
    secret_text = "the encrypted plan is Operation Tulip"
    await alice.capsule.send(bob.jid, secret_text)
    carol = await connect(new_account("carol"))
    carol.send_message(mto=bob.jid, mbody="a plaintext note from carol", mtype="chat")
    await wait_stored(xmpp_stack, "offline", bob.account.user, at_least=2)
    (row,) = await wait_stored(xmpp_stack, "offline", bob.account.user, containing="urn:capsule:0")
    payload = re.search(r"<payload>([^<]{40})", row).group(1)
    state = xmpp_stack.info
    shot = tmp_path / "webadmin-queue.png"
    result = await asyncio.to_thread(
        check_ejabberd_queue, "127.0.0.1", state.http_port, state.domain, bob.account.user,
        state.admin_password, shot, ["a plaintext note from carol", "urn:capsule:0", payload],
        [secret_text])
    assert result.ok, (result.missing, result.leaked)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    # the same check from the command line; a text that is shown fails it as a leak
    password = tmp_path / "admin-password"
    password.write_text(state.admin_password)
    common = ["panel", "ejabberd", "--password-file", str(password), "--port",
              str(state.http_port), "--domain", state.domain, "--user", bob.account.user,
              "--screenshot", str(tmp_path / "cli.png")]
    assert await asyncio.to_thread(capsule_main, [*common, "--show", "urn:capsule:0",
                                                  "--hide", secret_text]) == 0
    assert await asyncio.to_thread(capsule_main, [*common, "--hide", "a plaintext note"]) == 2
