"""Wire format v1 bot to bot over a real server: session keys published on PEP at login, v1
sealed to them, only ciphertext stored, and after the retention window the capsule taken from
the server's archive opens for nobody (the profile reloaded from disk included)."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import pytest
from slixmpp import Message

from capsule import algorithms as alg
from capsule import capsule_info, v1, wire
from capsule import namespaces as ns
from capsule.errors import SessionExpired
from capsule.profile import Profile
from capsule.testing.inbox import Inbox
from capsule_stack.rows import wait_stored

from .helpers import assert_ciphertext_only, secret

pytestmark = pytest.mark.usefixtures("no_plaintext_in_debug_log")


async def test_v1_bot_to_bot_and_the_archive_is_closed_after_retention(xmpp_stack, capsule_bot):
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    inbox = Inbox(bob.client)
    text = secret("forward secret")
    await alice.capsule.send(bob.jid, text)
    msg = await inbox.message()
    assert msg["body"] == text and capsule_info(msg) is not None
    (row,) = await wait_stored(xmpp_stack, "archive", bob.account.user,
                               containing=ns.V1_NAMESPACE)
    assert_ciphertext_only(xmpp_stack, bob.account.user, [text])
    archived = Message(xml=ET.fromstring(row))
    element = wire.find(archived.xml)
    assert element is not None
    capsule = wire.parse(element)
    assert isinstance(capsule, v1.Capsule)
    archived["from"], archived["to"] = f"{alice.jid}/x", bob.jid
    opened = await bob.capsule.open(archived, replay_check=False, origin="archive")
    assert opened["body"] == text  # within the window, from the server's archive
    later = int(time.time()) + alg.SESSION_LIFETIME_S + alg.SESSION_RETENTION_S + 60
    bob.capsule.keyring.rotate(later)  # the retention window has passed
    with pytest.raises(SessionExpired):
        await bob.capsule.open(archived, replay_check=False, origin="archive")
    await bob.client.disconnect(wait=1)
    thief = Profile.load(bob.profile, bob.pin)  # what the disk holds, with the PIN
    keys = thief.session_keys()
    assert not keys.keys() & {k.sid for k in capsule.header.keys}
    with pytest.raises(SessionExpired):
        v1.unseal(capsule, jid=bob.jid, sessions=keys, destroyed=thief.destroyed_sessions())
