"""A receiving bot in its own process, so a test can SIGKILL it: ``python -m tests.delivery_receiver
CONFIG`` (a 0600 JSON file: jid, password, profile, pin, port, ca_root, out; no secret in argv).

Every message the app gets is appended to ``out`` at once (a killed process loses nothing it
wrote); "ready" is printed when the session is up.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from slixmpp import ClientXMPP, Message

from capsule.connection import login
from capsule.plugin import attach


async def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    client = ClientXMPP(f"{config['jid']}/receiver", config["password"])
    out = open(config["out"], "a", buffering=1)  # open for the life of the process

    def deliver(msg: Message) -> None:
        out.write(msg["body"] + "\n")

    client.add_event_handler("message", deliver)
    client.add_event_handler("session_start", lambda _: client.send_presence())
    attach(client, config["profile"], config["pin"], publish=False)
    await login(client, "127.0.0.1", config["port"], config["ca_root"])
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
