"""A small client of Openfire's REST API plugin (users and system properties).

Auth is ``plugin.restapi.httpAuth = secret``: the header is literally ``Authorization: <secret>``.
Base URL ``http://HOST:9090/plugins/restapi/v1/``. Provisioning is idempotent: it reads first
and writes only what differs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any


class RestError(Exception):
    """An error answer from the REST API, with its status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"REST API answered {status}: {message}")
        self.status = status


@dataclass
class Change:
    what: str
    changed: bool

    def __str__(self) -> str:
        return f"{'changed  ' if self.changed else 'unchanged'} {self.what}"


class OpenfireRest:
    def __init__(self, base_url: str, secret: str, timeout: float = 15):
        self.base = base_url.rstrip("/") + "/plugins/restapi/v1/"
        self.secret = secret
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(  # noqa: S310 - an http(s) URL from the config
            self.base + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": self.secret, "Accept": "application/json",
                     "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                data = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:200]
            try:
                detail = json.loads(detail).get("message", detail)
            except (ValueError, AttributeError):
                pass
            raise RestError(exc.code, detail or exc.reason) from None
        except urllib.error.URLError as exc:
            raise RestError(0, f"cannot reach {self.base}: {exc.reason}") from None
        return json.loads(data) if data.strip() else None

    # -- reads ------------------------------------------------------------------
    def readiness(self) -> bool:
        try:
            self._call("GET", "system/readiness")
        except RestError:
            return False
        return True

    def users(self) -> list[dict[str, Any]]:
        data = self._call("GET", "users") or {}
        users = data.get("users", [])
        return users if isinstance(users, list) else [users]

    def get_property(self, key: str) -> str | None:
        try:
            data = self._call("GET", f"system/properties/{urllib.parse.quote(key)}")
        except RestError as exc:
            if exc.status == 404:
                return None
            raise
        return None if data is None else str(data.get("value"))

    # -- idempotent writes ------------------------------------------------------
    def ensure_user(self, username: str, password: str, name: str = "", email: str = ""
                    ) -> Change:
        if any(u.get("username") == username for u in self.users()):
            return Change(f"user {username}", False)
        self._call("POST", "users", {"username": username, "password": password, "name": name,
                                     "email": email})
        return Change(f"user {username}", True)

    def remove_user(self, username: str) -> Change:
        try:
            self._call("DELETE", f"users/{urllib.parse.quote(username)}")
        except RestError as exc:
            if exc.status == 404:
                return Change(f"user {username} (absent)", False)
            raise
        return Change(f"user {username} removed", True)

    def ensure_property(self, key: str, value: str) -> Change:
        current = self.get_property(key)
        if current == value:
            return Change(f"property {key}", False)
        body = {"key": key, "value": value}
        if current is None:
            self._call("POST", "system/properties", body)
        else:
            self._call("PUT", f"system/properties/{urllib.parse.quote(key)}", body)
        return Change(f"property {key}", True)
