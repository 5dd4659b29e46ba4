"""A FAKE of Openfire's REST API plugin, for tests only: Openfire cannot run here.

Built from the documented endpoints and answers (openfire-notes.md, REST API plugin 1.12):
the literal ``Authorization: <secret>`` header, 401 without it, ``POST users`` -> 201,
an existing user -> 409, a missing one -> 404, ``GET/POST system/properties``,
``PUT/DELETE system/properties/{key}``, ``GET system/readiness``. It records every request
so tests can see that a second provisioning run writes nothing.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

PREFIX = "/plugins/restapi/v1/"


class FakeOpenfireRest:
    def __init__(self, secret: str):
        self.secret = secret
        self.users: dict[str, dict[str, str]] = {}
        self.properties: dict[str, str] = {"xmpp.domain": "example.org"}
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: Any = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                fake.requests.append((method, self.path))
                if self.headers.get("Authorization") != fake.secret:
                    return self._answer(401, {"message": "Unauthorized"})
                if not self.path.startswith(PREFIX):
                    return self._answer(404, {"message": "Not Found"})
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, answer = fake.route(method, unquote(self.path[len(PREFIX):]), body)
                self._answer(status, answer)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def writes(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] != "GET"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if parts == ["system", "readiness"] and method == "GET":
            return 200, None
        if parts[0] == "users":
            if len(parts) == 1 and method == "GET":
                return 200, {"users": list(self.users.values())}
            if len(parts) == 1 and method == "POST":
                if body["username"] in self.users:
                    return 409, {"exception": "UserAlreadyExistsException",
                                 "message": "User already exists"}
                self.users[body["username"]] = {k: body.get(k, "") for k in
                                                ("username", "name", "email")}
                return 201, None
            if len(parts) == 2 and method == "DELETE":
                if self.users.pop(parts[1], None) is None:
                    return 404, {"exception": "UserNotFoundException",
                                 "message": "User not found"}
                return 200, None
        if parts[:2] == ["system", "properties"]:
            if len(parts) == 2 and method == "GET":
                return 200, {"properties": [{"key": k, "value": v}
                                            for k, v in self.properties.items()]}
            if len(parts) == 2 and method == "POST":
                if body["key"] in self.properties:
                    return 409, {"message": "Property already exists"}
                self.properties[body["key"]] = body["value"]
                return 201, None
            key = parts[2] if len(parts) == 3 else ""
            if method == "GET":
                if key not in self.properties:
                    return 404, {"exception": "PropertyNotFoundException",
                                 "message": "Property not found"}
                return 200, {"key": key, "value": self.properties[key]}
            if method == "PUT":
                if key not in self.properties:
                    return 404, {"message": "Property not found"}
                self.properties[key] = body["value"]
                return 200, None
            if method == "DELETE":
                return (200, None) if self.properties.pop(key, None) is not None else (
                    404, {"message": "Property not found"})
        return 404, {"message": "Not Found"}
