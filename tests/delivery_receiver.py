"""A receiving bot in its own process, so a test can SIGKILL it: ``python -m tests.delivery_receiver
CONFIG`` (a 0600 JSON file: jid, password, profile, pin, port, ca_root, out; no secret in argv).

Every message the app gets is appended to ``out`` at once (a killed process loses nothing it
wrote), every ``capsule_error`` to ``errors`` (reason and stanza id); the log (INFO) goes to
``log``; "ready" is printed when the session is up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

from slixmpp import ClientXMPP

from capsule.connection import login
from capsule.plugin import attach


async def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    client = ClientXMPP(f"{config['jid']}/receiver", config["password"])
    logging.basicConfig(filename=config["log"], level=logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    out = open(config["out"], "a", buffering=1)  # open for the life of the process
    errors = open(config["errors"], "a", buffering=1)
    client.add_event_handler("message", lambda msg: out.write(msg["body"] + "\n"))
    client.add_event_handler("capsule_error",
                             lambda failure: errors.write(f"{failure.reason} {failure.stanza_id}\n"))
    client.add_event_handler("session_start", lambda _: client.send_presence())
    attach(client, config["profile"], config["pin"], publish=False)
    await login(client, "127.0.0.1", config["port"], config["ca_root"])
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
