"""Provision accounts over XMPP with XEP-0133 Service Administration ad-hoc commands.

The admin logs in over STARTTLS verified against our CA and runs the commands at the server's
domain. Openfire has them built in; ejabberd (``mod_configure``) and Prosody
(``mod_admin_adhoc``) too, which is how this code is tested in CI. A command that fails comes
back either as an IQ error or as a completed command with an error note (Prosody, Openfire);
both raise ``AdminCommandError``. Nothing here matches on the servers' message texts.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from slixmpp import JID, ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0004 import Form

from capsule.connection import LoginError, login

NS = "http://jabber.org/protocol/admin"
ADD_USER = NS + "#add-user"
DELETE_USER = NS + "#delete-user"
CHANGE_PASSWORD = NS + "#change-user-password"
COUNT_USERS = NS + "#get-registered-users-num"
LIST_USERS = NS + "#get-registered-users-list"
COMMANDS = "http://jabber.org/protocol/commands"


class AdminCommandError(Exception):
    """A service-administration command was refused or failed (``node``, ``condition``)."""

    def __init__(self, node: str, condition: str, detail: str = ""):
        super().__init__(f"{node.rpartition('#')[2]}: {condition}" + (f" ({detail})" if detail else ""))
        self.node = node
        self.condition = condition  # an XMPP error condition, or "error-note", "unsupported"


@dataclass(frozen=True)
class Change:
    what: str
    changed: bool

    def __str__(self) -> str:
        return f"{'changed  ' if self.changed else 'unchanged'} {self.what}"


class ServiceAdmin:
    """An admin session; use ``async with ServiceAdmin(...) as admin:``."""

    def __init__(self, admin_jid: str, password: str, host: str, port: int, ca_root: str | Path,
                 tls_max: ssl.TLSVersion | None = None, timeout: float = 30):
        self.admin_jid, self.password = admin_jid, password
        self.host, self.port, self.ca_root, self.tls_max = host, port, ca_root, tls_max
        self.timeout = timeout
        self.domain = admin_jid.partition("@")[2].partition("/")[0]
        self.client = ClientXMPP(admin_jid, password)
        self.client.register_plugin("xep_0004")
        self.client.register_plugin("xep_0030")
        self.client.register_plugin("xep_0050")

    async def __aenter__(self) -> ServiceAdmin:
        await login(self.client, self.host, self.port, self.ca_root, self.timeout,
                    tls_max=self.tls_max)
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None
                        ) -> None:
        await self.client.disconnect()

    async def commands(self) -> set[str]:
        """The command nodes the server offers this admin."""
        try:
            items = await self.client.plugin["xep_0030"].get_items(
                jid=JID(self.domain), node=COMMANDS, timeout=self.timeout)
        except IqError as exc:
            raise AdminCommandError(COMMANDS, exc.condition) from None
        return {node for _jid, node, _name in items["disco_items"]["items"]}

    async def run(self, node: str, values: dict[str, str | list[str]]) -> dict[str, object]:
        """Execute ``node``, submit ``values`` for the fields its form has, return the result's fields."""
        adhoc = self.client.plugin["xep_0050"]
        try:
            first = await adhoc.send_command(self.domain, node, timeout=self.timeout)
            command = first["command"]
            _raise_on_error_note(node, command)
            if command["status"] == "completed":
                return _fields(command)
            offered = command["form"].get_fields()
            submit = Form()
            submit["type"] = "submit"
            submit.add_field(var="FORM_TYPE", ftype="hidden", value=NS)
            for var, value in values.items():
                if var in offered:
                    submit.add_field(var=var, ftype=offered[var]["type"] or None, value=value)
            final = await adhoc.send_command(self.domain, node, action="complete", payload=submit,
                                             sessionid=command["sessionid"], timeout=self.timeout)
        except IqError as exc:
            raise AdminCommandError(node, exc.condition, exc.text) from None
        except IqTimeout:
            raise AdminCommandError(node, "timeout", f"no answer in {self.timeout:.0f} s") from None
        _raise_on_error_note(node, final["command"])
        return _fields(final["command"])

    # -- accounts ---------------------------------------------------------------
    def jid(self, username: str) -> str:
        return f"{username}@{self.domain}"

    async def add_user(self, username: str, password: str, name: str = "", email: str = "") -> None:
        given, _, surname = name.partition(" ")
        await self.run(ADD_USER, {"accountjid": self.jid(username), "password": password,
                                  "password-verify": password, "email": email,
                                  "given_name": given, "surname": surname})

    async def delete_user(self, username: str) -> None:
        await self.run(DELETE_USER, {"accountjids": [self.jid(username)]})

    async def change_password(self, username: str, password: str) -> None:
        await self.run(CHANGE_PASSWORD, {"accountjid": self.jid(username), "password": password})

    async def _offered(self, node: str) -> None:
        """Optional commands (Prosody 0.12 has no user count or list): refuse clearly."""
        if node not in await self.commands():
            raise AdminCommandError(node, "unsupported", "the server does not offer this command")

    async def count_users(self) -> int:
        await self._offered(COUNT_USERS)
        fields = await self.run(COUNT_USERS, {})
        return int(str(fields.get("registeredusersnum", "")) or "0")

    async def list_users(self) -> list[str]:
        await self._offered(LIST_USERS)
        fields = await self.run(LIST_USERS, {})
        jids = fields.get("registereduserjids", [])
        return sorted(str(j) for j in (jids if isinstance(jids, list) else [jids]))

    async def can_log_in(self, username: str, password: str) -> bool:
        """Whether the account exists with this password: a real login, then a disconnect."""
        probe = ClientXMPP(self.jid(username), password)
        try:
            await login(probe, self.host, self.port, self.ca_root, self.timeout,
                        tls_max=self.tls_max)
        except LoginError:
            await forget(probe)
            return False
        await probe.disconnect()
        return True

    async def ensure_user(self, username: str, password: str, name: str = "", email: str = ""
                          ) -> Change:
        """The account exists with this password afterwards; writes only what differs."""
        if await self.can_log_in(username, password):
            return Change(f"user {username}", False)
        try:
            await self.add_user(username, password, name, email)
            return Change(f"user {username} created", True)
        except AdminCommandError as add_error:
            try:  # it exists with another password
                await self.change_password(username, password)
            except AdminCommandError:
                raise add_error from None
        return Change(f"user {username} password reset", True)



async def forget(client: ClientXMPP) -> None:
    """Finalise a client whose login failed while the loop still runs: slixmpp's __del__
    cancels its stream task, which must then get a turn (else "Task was destroyed")."""
    client.__del__()
    await asyncio.sleep(0)


def _raise_on_error_note(node: str, command: object) -> None:
    notes = command["notes"]  # type: ignore[index]
    errors = [text for kind, text in notes if kind == "error"]
    if errors:
        raise AdminCommandError(node, "error-note", errors[0].splitlines()[0] if errors[0] else "")


def _fields(command: object) -> dict[str, object]:
    form = command["form"]  # type: ignore[index]
    return {var: field["value"] for var, field in form.get_fields().items()}
