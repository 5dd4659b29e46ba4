"""``openfire-setup/install``: the install as a list of steps, printed by --dry-run, run for real.

Every check runs before the first change; a failed check refuses with one line and changes
nothing. Steps: Java and MariaDB packages, the database and its user, the Openfire tarball
(local file, or a download checked against a SHA-256), the enabled plugins (Monitoring, REST API), the
server certificate from our CA into Openfire's keystore and the CA root into client.truststore,
openfire.xml with <autosetup> and the seeded properties, the service (systemd, or Openfire's own
launcher under a PID file on hosts without systemd), the first start and readiness (an admin
login over STARTTLS), clean-up of openfire.xml and ofProperty, a restart to prove the install
survives one, the seeded properties checked in ofProperty, and a summary.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from capsule.audit.sources import Dsn  # the same DSN syntax as capsule audit
from capsule.files import write_private
from capsule_ca import Authority
from capsule_openfire import database, keystore, ready, render
from capsule_openfire.config import Config
from capsule_openfire.service import Launcher, Systemd, has_systemd

DOWNLOADS = "https://www.igniterealtime.org/downloadServlet?filename="
PLUGIN_DOWNLOADS = "https://www.igniterealtime.org/projects/openfire/plugins/{version}/{jar}"
PORTS = (5222, 5223, 5269, 7070, 7443, 9090, 9091)
APT = ["openjdk-17-jre-headless"]


class InstallError(Exception):
    """A check refused the install, or a step failed."""


@dataclass
class Step:
    title: str
    run: Callable[[], None]
    commands: list[list[str]] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    shows: str = ""  # file content for --dry-run (secrets masked)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cmd(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InstallError(f"{' '.join(cmd[:3])} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Installer:
    def __init__(self, config: Config, force: bool = False, root: Path = Path("/")):
        self.config = config
        self.force = force
        self.root = root  # tests render into a scratch root
        o = config.values["openfire"]
        self.dir = root / o["install_dir"].lstrip("/")
        self.tarball = f"openfire_{o['version'].replace('.', '_')}.tar.gz"
        self.work = root / "var/lib/capsule-openfire-setup"
        self.service = service_for(config, root)

    # -- checks (no changes) ---------------------------------------------------
    def checks(self) -> list[tuple[str, Callable[[], str | None]]]:
        """(what, check) pairs; a check returns an error text or None."""
        o, d, p = (self.config.values[s] for s in ("openfire", "database", "plugins"))

        def root_user() -> str | None:
            return None if os.geteuid() == 0 else "must run as root"

        def os_release() -> str | None:
            try:
                text = Path("/etc/os-release").read_text()
            except OSError:
                return "cannot read /etc/os-release"
            ids = {line.split("=", 1)[1].strip('"') for line in text.splitlines()
                   if line.startswith(("ID=", "ID_LIKE="))}
            return None if ids & {"debian", "ubuntu"} else f"unsupported OS {ids}: Debian/Ubuntu only"

        def java() -> str | None:
            if shutil.which("java") or shutil.which("apt-get"):
                return None
            return "Java 17 is missing and apt-get is not available to install it"

        def existing() -> str | None:
            if self.dir.exists() and not self.force:
                return f"{self.dir} exists: an Openfire is installed (use --force to replace it)"
            return None

        def ports() -> str | None:
            busy = [str(port) for port in PORTS if _port_busy(port)]
            return f"ports in use: {', '.join(busy)}" if busy else None

        def files() -> str | None:
            wanted = [("package", o["sha256"])] + [
                (f"{name}_file", p[f"{name}_sha256"]) for name in ("monitoring", "restapi")
                if self.config.flag(f"plugins.{name}")]
            for key, sha in wanted:
                local = (o if key == "package" else p)[key]
                if local and not Path(local).is_file():
                    return f"{key} {local} does not exist"
                if not local and not sha:
                    return (f"no {key} given and no SHA-256 to check a download against: set "
                            f"the matching *sha256 key or give a local file")
                if local and sha and _sha256(Path(local)) != sha.lower():
                    return f"checksum mismatch for {local}"
            return None

        def database_reachable() -> str | None:
            if d["mode"] == "local":
                return None
            try:
                with socket.create_connection((d["host"], int(d["port"])), timeout=5):
                    return None
            except OSError as exc:
                return f"database {d['host']}:{d['port']} unreachable: {exc.strerror or exc}"

        def ca() -> str | None:
            ca_dir = Path(self.config["tls.ca_dir"])
            return None if (ca_dir / "root.pem").is_file() else f"{ca_dir} is not a capsule-ca directory"

        return [("running as root", root_user), ("Debian or Ubuntu", os_release),
                ("Java 17 present or installable", java), ("no Openfire installed yet", existing),
                ("Openfire's ports free", ports), ("packages and checksums", files),
                ("database reachable", database_reachable), ("our CA", ca)]

    def preflight(self) -> None:
        for what, check in self.checks():
            error = check()
            if error:
                raise InstallError(f"refused ({what}): {error}")

    # -- steps -----------------------------------------------------------------
    def steps(self) -> list[Step]:
        c = self.config
        o, d = c.values["openfire"], c.values["database"]
        conf = self.dir / "conf/openfire.xml"
        security = self.dir / "resources/security"
        tls = self.work / "tls"
        plugins = self.dir / "plugins"
        db_client = (["mariadb"] if d["mode"] == "local"  # root over the local socket
                     else ["mariadb", f"--defaults-extra-file={self.work / 'client.cnf'}"])
        steps = [
            Step("install Java 17" + (" and MariaDB" if d["mode"] == "local" else ""),
                 self._packages,
                 [["apt-get", "install", "-y", "--no-install-recommends", *self._apt()]]),
            Step("create the database (utf8mb4) and its user", self._database,
                 [db_client],
                 shows=database.create_sql(d["name"], d["user"], render.MASK, self._db_hosts())),
            Step(f"fetch and check {self.tarball}", self._fetch_openfire,
                 writes=[str(self.work / self.tarball)]),
            Step(f"unpack Openfire {o['version']} into {self.dir}", self._unpack,
                 writes=[str(self.dir)]),
            Step("install the plugins: " + (", ".join(self._plugin_jars()) or "none"),
                 self._plugins, writes=[str(plugins / jar) for jar in self._plugin_jars()]),
            Step("issue the server certificate (SAN domain + FQDN) and import it", self._tls,
                 keystore.import_commands(tls / "server.key", tls / "chain.pem",
                                          Path(c["tls.ca_dir"]) / "root.pem", security,
                                          o["domain"], tls / "server.p12"),
                 writes=[str(tls / "server.key"), str(tls / "chain.pem"),
                         str(security / "keystore"), str(security / "client.truststore")]),
            Step("write openfire.xml with <autosetup> and the seeded properties",
                 self._write_conf, writes=[str(conf)],
                 shows=render.openfire_xml(c, mask_secrets=True)),
            Step(f"create user {o['user']}, hand it {self.dir}, start Openfire "
                 f"({self.service.describe()})", self._start,
                 self.service.commands(), writes=self.service.files()),
            Step("wait until the console answers and the admin logs in over STARTTLS",
                 self._wait_ready),
            Step("remove <autosetup> from openfire.xml, REST secrets from ofProperty",
                 self._clean, writes=[str(conf)]),
            Step("restart Openfire and wait again (the install must survive a restart)",
                 self._restart),
            Step("check the seeded properties in ofProperty", self._check_properties,
                 shows="\n".join(f"{k} = {v}" for k, v in render.seeded_properties(c).items())),
        ]
        return steps

    def _apt(self) -> list[str]:
        local = self.config["database.mode"] == "local"
        return APT + (["mariadb-server", "mariadb-client"] if local else ["mariadb-client"])

    def _packages(self) -> None:
        """Install only what is missing: an installed Java or MariaDB is never upgraded."""
        missing = [p for p in self._apt() if subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True,
            check=False).stdout.strip() != "install ok installed"]
        if missing:
            _cmd(["apt-get", "install", "-y", "--no-install-recommends", *missing])

    def _db_hosts(self) -> tuple[str, ...]:
        return ("localhost", "127.0.0.1") if self.config["database.mode"] == "local" else ("%",)

    def _database(self) -> None:
        d = self.config.values["database"]
        self.work.mkdir(parents=True, exist_ok=True)
        if d["mode"] == "local":
            _cmd(["systemctl", "enable", "--now", "mariadb"] if has_systemd(self.root)
                 else ["service", "mariadb", "start"])  # Debian's init script, no systemd
            args: list[str] = []  # root over the socket
        else:
            args = [f"--defaults-extra-file={Dsn.parse(d['admin_dsn']).option_file(str(self.work))}"]
        deadline = time.monotonic() + 60  # autosetup writes setup=true before checking the DB
        while True:
            try:
                database.run_sql(args, "SELECT 1;")
                break
            except database.DatabaseError as exc:
                if time.monotonic() > deadline:
                    raise InstallError(f"database not reachable: {exc}") from None
                time.sleep(1)
        database.run_sql(args, database.create_sql(d["name"], d["user"], d["password"],
                                                   self._db_hosts()))

    def _fetch(self, local: str, url: str, sha: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        if local:
            shutil.copyfile(local, target)
        else:
            with urllib.request.urlopen(url, timeout=120) as response, open(target, "wb") as f:  # noqa: S310
                shutil.copyfileobj(response, f)
        if sha and _sha256(target) != sha.lower():
            target.unlink()
            raise InstallError(f"checksum mismatch for {url if not local else local}")

    def _fetch_openfire(self) -> None:
        o = self.config.values["openfire"]
        self._fetch(o["package"], DOWNLOADS + "openfire/" + self.tarball, o["sha256"],
                    self.work / self.tarball)

    def _unpack(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)  # only reached with --force
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(self.work / self.tarball) as tar, tempfile.TemporaryDirectory(
                dir=self.dir.parent) as tmp:
            tar.extractall(tmp, filter="data")
            (Path(tmp) / "openfire").rename(self.dir)

    def _plugin_jars(self) -> list[str]:
        return [jar for name, jar in (("monitoring", "monitoring.jar"), ("restapi", "restAPI.jar"))
                if self.config.flag(f"plugins.{name}")]

    def _plugins(self) -> None:
        p = self.config.values["plugins"]
        for name, jar in (("monitoring", "monitoring.jar"), ("restapi", "restAPI.jar")):
            if self.config.flag(f"plugins.{name}"):
                url = PLUGIN_DOWNLOADS.format(version=p[f"{name}_version"], jar=jar)
                self._fetch(p[f"{name}_file"], url, p[f"{name}_sha256"], self.dir / "plugins" / jar)

    def _tls(self) -> None:
        o = self.config.values["openfire"]
        passfile = self.config["tls.ca_passphrase_file"]
        passphrase = (Path(passfile).read_text().strip() if passfile
                      else os.environ.get("CAPSULE_CA_PASSPHRASE", ""))
        ca = Authority(self.config["tls.ca_dir"], passphrase.encode())
        files = ca.issue_server(o["domain"], self.work / "tls", fqdn=o["fqdn"])
        keystore.import_server_cert(files.key, files.chain, ca.root_path,
                                    self.dir / "resources/security", o["domain"])

    def _write_conf(self, text: str | None = None) -> None:
        """openfire.xml, 0600 and owned by the service user: Openfire must read and rewrite it
        (root-owned, Openfire falls back to setup mode at the next start)."""
        conf = self.dir / "conf/openfire.xml"
        write_private(conf, (text or render.openfire_xml(self.config)).encode())
        account = _account(self.config["openfire.user"])
        if account is not None:
            os.chown(conf, account.pw_uid, account.pw_gid)

    def _start(self) -> None:
        user = self.config["openfire.user"]
        if _account(user) is None:
            _cmd(["useradd", "--system", "--user-group", "--home-dir", str(self.dir),
                  "--shell", "/usr/sbin/nologin", user])
        (self.dir / "logs").mkdir(exist_ok=True)  # Openfire writes there; the tarball has none
        _cmd(["chown", "-R", f"{user}:", str(self.dir)])
        self.service.install()
        self.service.start()

    def _wait_ready(self) -> None:
        try:
            ready.wait_ready(self.config, alive=self.service.running)
        except ready.NotReady as exc:
            raise InstallError(f"{exc}; see {self.dir}/logs/") from None

    def _clean(self) -> None:
        conf = self.dir / "conf/openfire.xml"
        self._write_conf(render.without_autosetup(conf.read_text()))
        # an earlier install (or a hand-enabled REST plugin) may have left its shared secret
        ready.property_sql(self.config, "DELETE FROM ofProperty WHERE name = "
                                        "'plugin.restapi.secret';")

    def _restart(self) -> None:
        self.service.stop()
        self.service.start()
        self._wait_ready()

    def _check_properties(self) -> None:
        ok, detail = ready.check_properties(self.config)
        if not ok:
            raise InstallError(f"ofProperty after the start: {detail}")

    def summary(self) -> str:
        o = self.config.values["openfire"]
        return (f"Openfire {o['version']} for {o['domain']} ({o['fqdn']})\n"
                f"  c2s 5222 (STARTTLS required), 5223 (direct TLS); admin console "
                f"http://{o['console_interface']}:9090/ (user admin)\n"
                f"  service: {self.service.describe()}; openfire-setup/service CONFIG "
                f"start|stop|restart|status\n"
                f"  secrets (admin, database, users): {self.config.secrets_path} (0600)")

    # -- driving ---------------------------------------------------------------
    def plan(self) -> str:
        """What --dry-run prints: every check, step, command and file; nothing is changed."""
        lines = ["checks (all before any change):"]
        lines += [f"  - {what}" for what, _ in self.checks()]
        for i, step in enumerate(self.steps(), start=1):
            lines.append(f"step {i}: {step.title}")
            lines += [f"    run   {' '.join(_mask(a, self.config) for a in cmd)}"
                      for cmd in step.commands]
            lines += [f"    write {path}" for path in step.writes]
            if step.shows:
                lines += ["    | " + line for line in step.shows.splitlines()]
        return "\n".join(lines)

    def run(self, log: Callable[[str], None] = print) -> None:
        self.preflight()
        for i, step in enumerate(self.steps(), start=1):
            log(f"[{i}] {step.title}")
            step.run()
        log(self.summary())


def _account(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def service_for(config: Config, root: Path = Path("/")) -> Systemd | Launcher:
    """systemd where the host runs it (or the config says so), else Openfire's launcher."""
    install_dir = root / config["openfire.install_dir"].lstrip("/")
    choice = config["openfire.service"]
    if choice == "systemd" or (choice == "auto" and has_systemd(root)):
        return Systemd(install_dir, config["openfire.user"],
                       root / "etc/systemd/system/openfire.service")
    return Launcher(install_dir, config["openfire.user"], root / "run/openfire/openfire.pid",
                    install_dir / "logs/launcher.log")


def _mask(arg: str, config: Config) -> str:
    for secret in config.secret_values:
        if secret and secret in arg:
            arg = arg.replace(secret, render.MASK)
    return arg
