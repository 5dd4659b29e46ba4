"""Bot to bot over real ejabberd and Prosody: encrypted round trips and what the server stored."""

from __future__ import annotations

import asyncio
import secrets

from capsule import capsule_info


def secret(label: str) -> str:
    """A unique plaintext, so a leak can be found in rows and logs."""
    return f"{label} {secrets.token_hex(8)}"


async def test_round_trip_and_server_stores_only_ciphertext(xmpp_stack, capsule_bot):
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    got: asyncio.Queue = asyncio.Queue()
    bob.client.add_event_handler("message", got.put_nowait)
    text = secret("meet at dawn")
    await alice.capsule.send(bob.jid, text)
    msg = await asyncio.wait_for(got.get(), 15)
    assert msg["body"] == text
    info = capsule_info(msg)
    assert info is not None and info.encrypted and info.sender == alice.jid
    assert info.sender_cert.jid == alice.jid
    await asyncio.sleep(0.3)
    for user in (alice.account.user, bob.account.user):
        rows = xmpp_stack.stored("archive", user)
        assert rows, f"nothing archived for {user}"
        assert all("urn:capsule:0" in row for row in rows)
        assert not any(text in row for row in rows)
