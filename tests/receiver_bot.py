"""A receiving Capsule bot in its own process, for fault tests that SIGKILL it.

Usage: python receiver_bot.py JID PORT CA_ROOT PROFILE (password in $BOT_PASSWORD, PIN in
$CAPSULE_PIN). Prints one line per event, flushed: ``ready``, ``got <nid> <stanza id>`` once a message
reached the handlers (``again …`` if flagged ``recovered``: accepted before a crash, maybe
seen then), ``dup <stanza id>``, ``error <reason> <stanza id>``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from slixmpp import ClientXMPP

from capsule.connection import login
from capsule.plugin import attach, capsule_info


def say(*words: str) -> None:
    """One line in one write(2): a SIGKILL cannot leave half of it."""
    os.write(1, (" ".join(words) + "\n").encode())


async def main(jid: str, port: int, ca_root: str, profile: str) -> None:
    client = ClientXMPP(jid, os.environ["BOT_PASSWORD"])
    published = attach(client, profile, os.environ["CAPSULE_PIN"])

    def got(msg: Any) -> None:
        info = capsule_info(msg)
        say("again" if info and info.recovered else "got", info.nid if info else "plaintext",
            msg["id"] or "-")

    client.add_event_handler("capsule_message", got)
    client.add_event_handler("capsule_duplicate", lambda f: say("dup", f.stanza_id or "-"))
    client.add_event_handler("capsule_error", lambda f: say("error", f.reason, f.stanza_id or "-",
                                                            *f.message.split()))
    await login(client, "127.0.0.1", port, ca_root)
    await published(30)
    client.send_presence()  # flushes the offline queue
    say("ready")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))
