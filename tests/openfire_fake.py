"""A FAKE of Openfire's admin console, for tests only: Openfire cannot be installed in CI.

It answers only what was recorded on a live Openfire 4.5.0 (openfire-notes.md, issue 12):
``login.jsp`` carries a CSRF field and a form login; a page asked for without a session is
answered 302 -> ``login.jsp?url=<the page>`` (so a wrong password ends on the login form, whose
text names the archive page); while the server starts, plugin pages are answered 302 ->
login.jsp even with a session; a page of a plugin that is not loaded answers 404. The archive
pages themselves (Monitoring) are a minimal stand-in listing conversations.
"""

from __future__ import annotations

import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

LOGIN_FORM = """<html><head><title>Openfire Admin Console</title></head><body>
<form action="login.jsp" method="post" name="loginForm">
<input type="hidden" name="url" value="{url}"><input type="hidden" name="login" value="true">
<input type="hidden" name="csrf" value="{csrf}">
<input type="text" name="username"><input type="password" name="password">
</form>{error}</body></html>"""


class FakeOpenfireConsole:
    def __init__(self, admin_password: str, monitoring: bool = True, starting: bool = False,
                 conversations: dict[int, str] | None = None):
        self.admin_password = admin_password
        self.monitoring = monitoring  # the Monitoring plugin is loaded
        self.starting = starting  # Openfire is still starting: plugin URLs redirect to login
        self.conversations = conversations or {}  # conversationID -> the body shown
        self.sessions: set[str] = set()
        self.csrf: dict[str, str] = {}  # session cookie -> CSRF token of its login form
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: str = "", headers: dict[str, str] | None = None
                      ) -> None:
                data = body.encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "text/html; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _cookie(self) -> str:
                for part in (self.headers.get("Cookie") or "").split(";"):
                    name, _, value = part.strip().partition("=")
                    if name == "JSESSIONID":
                        return value
                return ""

            def _login_form(self, url: str, error: str = "") -> None:
                cookie = self._cookie() or secrets.token_hex(8)
                fake.csrf[cookie] = secrets.token_hex(8)
                self._send(200, LOGIN_FORM.format(url=url, csrf=fake.csrf[cookie], error=error),
                           {"Set-Cookie": f"JSESSIONID={cookie}; Path=/"})

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path))
                url = urlparse(self.path)
                if url.path == "/login.jsp":
                    return self._login_form(parse_qs(url.query).get("url", [""])[0])
                if self._cookie() not in fake.sessions or (
                        fake.starting and url.path.startswith("/plugins/")):
                    return self._send(302, headers={
                        "Location": f"http://{self.headers['Host']}/login.jsp?url="
                                    f"{quote(self.path, safe='')}"})
                if url.path.startswith("/plugins/monitoring/") and not fake.monitoring:
                    return self._send(404, "<html><body>HTTP ERROR 404 Not Found</body></html>")
                if url.path == "/plugins/monitoring/archive-search.jsp":
                    links = "".join(f'<a href="conversation-viewer.jsp?conversationID={n}">'
                                    f"conversation {n}</a>" for n in fake.conversations)
                    return self._send(200, f"<html><body><h1>Search Archive</h1>{links}"
                                           "</body></html>")
                if url.path == "/plugins/monitoring/conversation-viewer.jsp":
                    conv = int(parse_qs(url.query).get("conversationID", ["0"])[0])
                    if conv not in fake.conversations:
                        return self._send(500, "<html><body>No conversation</body></html>")
                    return self._send(200, f"<html><body><p>{fake.conversations[conv]}</p>"
                                           "</body></html>")
                return self._send(404, "<html><body>HTTP ERROR 404 Not Found</body></html>")

            def do_POST(self) -> None:
                fake.requests.append(("POST", self.path))
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                cookie = self._cookie()
                if (urlparse(self.path).path == "/login.jsp" and cookie
                        and form.get("csrf") == fake.csrf.get(cookie)
                        and form.get("username") == "admin"
                        and form.get("password") == fake.admin_password):
                    fake.sessions.add(cookie)
                    return self._send(302, headers={
                        "Location": f"http://{self.headers['Host']}/index.jsp"})
                return self._login_form(form.get("url", ""), "Invalid username or password.")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
