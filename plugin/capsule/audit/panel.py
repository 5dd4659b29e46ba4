"""The admin's web panel in a real browser: does it show ciphertext only for encrypted messages?

Headless Chromium (Debian's ``chromium``) loads the page, its DOM is searched for texts that
must and must not appear, and a screenshot is saved as evidence.

- ejabberd: WebAdmin's offline-queue page ``/admin/server/DOMAIN/user/USER/queue/`` (HTTP basic
  auth as an admin; the credentials go in the URL, so on Chromium's command line: use a
  dedicated audit admin account).
- Openfire: the Monitoring plugin's archive pages. The console uses a form login with a CSRF
  token, which the Chromium command line cannot fill in, so the pages are fetched over one
  logged-in session (redirects are never followed: where the console sends us is the answer)
  and the saved HTML is then rendered by Chromium. Any other answer than the archive page
  itself (a redirect to login.jsp: login refused or still starting; 404: the Monitoring plugin
  is not loaded; no answer) is a ``PanelError``, so nothing is judged that was not the archive.
  The login and the 404 were seen on a live Openfire 4.5.0; tests use a named fake of them.
"""

from __future__ import annotations

import http.cookiejar
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--hide-scrollbars",
]


class PanelError(Exception):
    """The browser or the panel could not be used."""


@dataclass
class PanelResult:
    page: str  # the URL without credentials
    screenshot: Path
    missing: list[str] = field(default_factory=list)  # should have been shown
    leaked: list[str] = field(default_factory=list)  # must never be shown
    pages: int = 1  # admin pages actually seen and judged

    @property
    def ok(self) -> bool:
        return self.pages > 0 and not self.missing and not self.leaked


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise PanelError("no Chromium: apt-get install chromium (./scripts/test installs it)")


def render(url: str, screenshot: Path, size: tuple[int, int] = (2200, 1400)) -> str:
    """Load ``url`` in headless Chromium; save a screenshot; return the rendered DOM."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        base = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True,
                             timeout=60, check=False)
        shot = subprocess.run([*base, f"--window-size={size[0]},{size[1]}",
                               f"--screenshot={screenshot}", url], capture_output=True,
                              text=True, timeout=60, check=False)
    if dom.returncode != 0 or shot.returncode != 0 or not screenshot.exists():
        raise PanelError(f"chromium failed on {url.split('@')[-1]}: "
                         f"{(dom.stderr or shot.stderr).strip().splitlines()[-1:]}")
    return dom.stdout


def _judge(text: str, page: str, screenshot: Path, show: list[str], hide: list[str]
           ) -> PanelResult:
    return PanelResult(page, screenshot, [s for s in show if s not in text],
                       [s for s in hide if s in text])


def check_ejabberd_queue(host: str, port: int, domain: str, user: str, admin_password: str,
                         screenshot: Path, show: list[str], hide: list[str],
                         admin: str = "admin") -> PanelResult:
    """Open USER's offline queue in ejabberd's WebAdmin as ADMIN@DOMAIN."""
    page = f"http://{host}:{port}/admin/server/{domain}/user/{user}/queue/"
    creds = urllib.parse.quote(f"{admin}@{domain}", safe="") + ":" + urllib.parse.quote(
        admin_password, safe="")
    dom = render(page.replace("http://", f"http://{creds}@", 1), screenshot)
    if "Offline Messages Queue" not in dom:
        raise PanelError(f"{page} did not show an offline queue (login refused?)")
    return _judge(dom, page, screenshot, show, hide)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a 3xx surfaces as HTTPError: where the console sends us is the answer


class _Console:
    """One session with Openfire's admin console; every answer but 200 is a PanelError."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), NoRedirect)

    def fetch(self, path: str, form: dict[str, str] | None = None) -> tuple[int, str, str]:
        """(status, redirect target path, body) of one request; 4xx/5xx/no answer raise."""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(self.base + path, data, timeout=20) as response:
                return response.status, "", response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                return exc.code, urllib.parse.urlparse(exc.headers.get("Location", "")).path, ""
            hint = (": the Monitoring plugin is not loaded" if exc.code == 404
                    and path.startswith("/plugins/monitoring/") else "")
            raise PanelError(f"{path.split('?')[0]} answered HTTP {exc.code}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise PanelError(f"Openfire console {self.base} unreachable: "
                             f"{getattr(exc, 'reason', exc)}") from None

    def page(self, path: str) -> str:
        """The body of ``path``; a redirect (to login.jsp, or anywhere) is a PanelError."""
        status, target, body = self.fetch(path)
        if status != 200:
            where = target.rsplit("/", 1)[-1] or "elsewhere"
            raise PanelError(f"{path.split('?')[0]}: the console sent us to {where} "
                             f"(HTTP {status}): not logged in, or Openfire is still starting")
        return body


def check_openfire_archive(console: str, admin: str, password: str, screenshot: Path,
                           show: list[str], hide: list[str]) -> PanelResult:
    """Log in to Openfire's admin console and render the Monitoring archive pages.

    ``console`` is e.g. ``http://127.0.0.1:9090``. Fetches ``archive-search.jsp`` and every
    ``conversation-viewer.jsp?conversationID=N`` it links to, within one session.
    """
    session = _Console(console)
    csrf = re.search(r'name="csrf" value="([^"]+)"', session.page("/login.jsp"))
    form = {"username": admin, "password": password, "login": "true"}
    if csrf:
        form["csrf"] = csrf.group(1)
    status, target, _body = session.fetch("/login.jsp", form)
    if status == 200 or target.endswith("login.jsp"):  # the form again: refused
        raise PanelError(f"Openfire console login refused for {admin}")
    search = session.page("/plugins/monitoring/archive-search.jsp")
    pages = [search] + [session.page(f"/plugins/monitoring/conversation-viewer.jsp?"
                                     f"conversationID={conv}")
                        for conv in sorted(set(re.findall(r"conversationID=(\d+)", search)))[:20]]
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "archive.html"
        saved.write_text("\n<hr>\n".join(pages))
        dom = render(saved.as_uri(), screenshot)
    result = _judge(dom, f"{console}/plugins/monitoring/archive-search.jsp", screenshot, show, hide)
    result.pages = len(pages)
    return result
