"""The demo: alice and bob over the private ejabberd + MariaDB stack, and the admin's view.

Run by ``./scripts/demo``. Starts a fresh stack in ``.demo/``; creates alice's and bob's
profiles with certificates from the stack's CA; alice adds bob as a contact and sees him
online; she sends one message from a client without Capsule (plaintext), then encrypted ones;
one more while bob is offline, which survives a server restart; then the demo prints what
MariaDB stored for each message, side by side, and stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

from slixmpp import JID, ClientXMPP, Message

from capsule import capsule_info
from capsule.audit.panel import PanelError, check_ejabberd_queue
from capsule.connection import LoginError, login
from capsule.errors import CapsuleError
from capsule.plugin import attach
from capsule.profile import KdfParams
from capsule.testing.identities import enroll
from capsule_stack.processes import StackError
from capsule_stack.stack import Stack

PIN = secrets.token_hex(4) + "00"  # a fresh demo PIN (digits and letters, 10 characters)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self, stack: Stack, directory: Path):
        self.stack = stack
        self.dir = directory
        self.state = stack.info
        self.passwords = {name: secrets.token_urlsafe(12) for name in ("alice", "bob")}
        self.jids = {name: JID(f"{name}@{self.state.domain}") for name in self.passwords}
        self.bob_inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.encrypted: list[str] = []

    def profile(self, name: str) -> Path:
        return self.dir / f"{name}.capsule"

    async def connect(self, name: str, with_capsule: bool = True) -> ClientXMPP:
        client = ClientXMPP(self.jids[name], self.passwords[name])
        published = attach(client, self.profile(name), PIN) if with_capsule else None
        if name == "bob":  # before the login: what waited offline comes right after it
            client.add_event_handler("message", self.on_bob_message)
            client.add_event_handler("capsule_error",
                                     lambda f: print(f"   bob: capsule error {f.reason}"))
        await login(client, "127.0.0.1", self.state.c2s_port, self.state.ca_root)
        client.send_presence()
        if published:
            await published(20)
        return client

    def enroll(self) -> None:
        step("alice and bob get accounts, profiles (PIN-encrypted) and certificates from our CA")
        authority = self.stack.authority()
        for name, password in self.passwords.items():
            self.stack.adduser(name, password)
            profile = enroll(authority, self.profile(name), str(self.jids[name]), PIN,
                             kdf=KdfParams())
            sign = self.stack.authority().valid_for(str(self.jids[name]))
            print(f"   {self.jids[name]}: profile {profile.path.name}, certificates "
                  f"{', '.join(f'{r.usage} #{r.serial}' for r in sign)}")

    def on_bob_message(self, msg: Message) -> None:
        info = capsule_info(msg)
        how = "encrypted, signature verified" if info else "PLAINTEXT"
        print(f"   bob reads ({how}): {msg['body']!r}")
        self.bob_inbox.put_nowait(msg)

    async def bob_reads(self, count: int) -> None:
        for _ in range(count):
            await asyncio.wait_for(self.bob_inbox.get(), 15)

    async def run(self) -> None:
        self.enroll()
        step("both log in over STARTTLS, the server certificate checked against our CA")
        alice = await self.connect("alice")
        bob = await self.connect("bob")

        step("alice adds bob as a contact and waits to see him online")
        online = asyncio.Event()

        def seen(presence: Any) -> None:
            if presence["from"].bare == self.jids["bob"]:
                online.set()

        alice.add_event_handler("presence_available", seen)
        alice.send_presence_subscription(pto=self.jids["bob"])
        await asyncio.wait_for(online.wait(), 15)
        print(f"   alice sees {self.jids['bob']} online")

        step("a client without Capsule (alice's old phone) sends a plaintext message")
        old_phone = await self.connect("alice", with_capsule=False)
        old_phone.send_message(mto=self.jids["bob"], mtype="chat",
                               mbody="Plain hello from alice's old phone")
        await self.bob_reads(1)
        await old_phone.disconnect(wait=1)

        step("alice sends encrypted messages (explicit API and an ordinary send_message)")
        self.encrypted += ["The vault code is 4711.", "Meet me at the north gate at six."]
        await plugin(alice).send(self.jids["bob"], self.encrypted[0])
        alice.send_message(mto=self.jids["bob"], mbody=self.encrypted[1], mtype="chat")
        await self.bob_reads(2)

        step("bob goes offline; alice sends one more encrypted message")
        await bob.disconnect(wait=1)
        self.encrypted.append("This one waited for you on the server, encrypted.")
        await plugin(alice).send(self.jids["bob"], self.encrypted[2])
        await asyncio.sleep(0.5)
        queued = self.stack.stored("offline", "bob")
        print(f"   the server's offline queue for bob holds {len(queued)} stanza(s)")
        await asyncio.to_thread(self.webadmin)
        await alice.disconnect(wait=1)

        step("the server restarts (MariaDB keeps the queue)")
        await asyncio.to_thread(self.stack.restart_server)

        step("bob logs in again and reads what waited for him")
        bob = await self.connect("bob")
        await self.bob_reads(1)
        await bob.disconnect(wait=1)
        self.admin_view(queued)

    def webadmin(self) -> None:
        """The admin's web panel in headless Chromium: the queued capsule, never its text."""
        shot = self.dir / "webadmin-queue.png"
        result = check_ejabberd_queue("127.0.0.1", self.state.http_port, self.state.domain,
                                      "bob", self.state.admin_password, shot,
                                      ["urn:capsule:"], [self.encrypted[-1]])
        if not result.ok:
            raise CapsuleError(f"WebAdmin showed {result.leaked} / lacked {result.missing}")
        print(f"   ejabberd WebAdmin ({result.page}) shows the queued capsule, not its text;")
        print(f"   screenshot: {shot}")

    def admin_view(self, queued: list[str]) -> None:
        step("what the server stored: the admin's view of MariaDB (table archive, mod_mam)")
        rows = self.stack.sql("SELECT txt, xml FROM archive WHERE username='bob' ORDER BY timestamp")
        width = 54
        print(f"   {'message as sent':<{width}} | what the archive row holds")
        print(f"   {'-' * width}-+-{'-' * width}")
        sent = ["Plain hello from alice's old phone", *self.encrypted]
        for text, row in zip(sent, rows.splitlines(), strict=False):
            _txt, xml = row.split("\t", 1)
            stored = _excerpt(xml)
            left, right = textwrap.wrap(text, width), textwrap.wrap(stored, width)
            left += [""] * (len(right) - len(left))
            right += [""] * (len(left) - len(right))
            for a, b in zip(left, right, strict=True):
                print(f"   {a:<{width}} | {b}")
            print(f"   {'':<{width}} |")
        print("   offline queue row of the message sent while bob was offline (table spool):")
        print(textwrap.indent(textwrap.fill(_excerpt(queued[-1] if queued else "", 300), 110),
                              "     "))
        everything = rows + "".join(queued)
        leaked = [t for t in self.encrypted if t in everything]
        if leaked:
            raise CapsuleError(f"the server stored plaintext of encrypted messages: {leaked}")
        print(f"\n   OK: the plaintext message is readable in the archive; none of the "
              f"{len(self.encrypted)} encrypted messages is.")


def plugin(client: ClientXMPP) -> Any:
    return cast(Any, client.plugin)["capsule"]


def _excerpt(xml: str, limit: int = 160) -> str:
    """The part of a stored stanza an admin would look at: the payload, or the body."""
    payload = re.search(r"<payload>([^<]*)</payload>", xml)
    if payload:
        data = payload.group(1)
        return f"<capsule …><payload>{data[:60]}… ({len(data)} chars of base64)</payload>"
    found = re.search(r"<body>.*?</body>", xml)
    text = found.group(0) if found else xml
    return text if len(text) <= limit else text[:limit] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=".demo", help="where the demo stack lives (wiped first)")
    args = parser.parse_args(argv)
    directory = Path(args.dir).resolve()
    Stack(directory / "stack").stop()  # a demo left running by a crash
    shutil.rmtree(directory, ignore_errors=True)  # each run starts from an empty server
    stack = Stack(directory / "stack", "ejabberd")
    try:
        step("starting the private stack: MariaDB + ejabberd on loopback, TLS from our own CA")
        state = stack.start()
        print(f"   {state.server} for {state.domain} on 127.0.0.1:{state.c2s_port}, "
              f"CA {state.ca_root}")
        asyncio.run(Demo(stack, directory).run())
    except (StackError, LoginError, CapsuleError, PanelError, TimeoutError) as exc:
        print(f"demo: error: {str(exc) or 'timed out'}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        print("\n== stack stopped; nothing left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())

