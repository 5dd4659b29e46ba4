"""The demo: two bots over the private ejabberd + MariaDB stack, and what the server stored.

Run by ``./scripts/demo``. Starts the stack in ``.demo/``, logs alice and bob in over TLS
verified against the stack's own CA, has alice write to bob while he is offline, restarts the
server, lets bob log in and read it, prints the rows MariaDB holds, and stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import sys
from pathlib import Path

from slixmpp import JID, ClientXMPP

from capsule.testing.processes import StackError
from capsule.testing.stack import Stack
from capsule.testing.xmpp import LoginError, login


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def scenario(stack: Stack) -> None:
    state = stack.info
    users = {name: secrets.token_urlsafe(12) for name in ("alice", "bob")}
    for name, password in users.items():
        try:
            stack.deluser(name)
        except StackError:
            pass
        stack.adduser(name, password)
    alice_jid, bob_jid = (JID(f"{n}@{state.domain}") for n in users)

    async def connect(name: str) -> ClientXMPP:
        client = ClientXMPP(f"{name}@{state.domain}", users[name])
        await login(client, "127.0.0.1", state.c2s_port, state.ca_root)
        client.send_presence()
        return client

    step(f"alice logs in over STARTTLS, server certificate verified against {state.ca_root}")
    alice = await connect("alice")
    print(f"   alice is {alice.boundjid}")
    text = "Hello Bob, this waits for you on the server."
    step(f"bob is offline; alice sends: {text!r}")
    alice.send_message(mto=bob_jid, mbody=text, mtype="chat")
    await asyncio.sleep(0.5)
    await alice.disconnect(wait=1)

    step("the server restarts (MariaDB keeps the offline queue)")
    await asyncio.to_thread(stack.restart_server)

    step("bob logs in and reads his offline messages")
    received: asyncio.Queue[str] = asyncio.Queue()
    bob = ClientXMPP(bob_jid, users["bob"])
    bob.add_event_handler("message", lambda msg: received.put_nowait(msg["body"]))
    await login(bob, "127.0.0.1", state.c2s_port, state.ca_root)
    bob.send_presence()
    body = await asyncio.wait_for(received.get(), 15)
    print(f"   bob received from {alice_jid}: {body!r}")
    await bob.disconnect(wait=1)

    step("what the server stored (MariaDB, the admin's view)")
    print("   archive (mod_mam), one row per side of the conversation:")
    print(stack.sql("SELECT username, bare_peer, LEFT(txt, 60) FROM archive "
                    "WHERE username IN ('alice', 'bob') ORDER BY timestamp"))
    print("   offline spool for bob (emptied on delivery):")
    print(stack.sql("SELECT COUNT(*) FROM spool WHERE username='bob'"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("--dir", default=".demo", help="where the demo stack lives")
    args = parser.parse_args(argv)
    directory = Path(args.dir).resolve()
    Stack(directory).stop()  # a demo left running by a crash
    shutil.rmtree(directory, ignore_errors=True)  # each run starts from an empty server
    stack = Stack(directory, "ejabberd")
    try:
        step("starting the private stack: MariaDB + ejabberd on loopback, TLS from our CA")
        state = stack.start()
        print(f"   {state.server} for {state.domain} on 127.0.0.1:{state.c2s_port}")
        asyncio.run(scenario(stack))
    except (StackError, LoginError, TimeoutError) as exc:
        print(f"demo: error: {exc or 'timed out'}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        print("\n== stack stopped; nothing left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
