"""openfire-setup, everything that can run without Openfire: rendering, keystores, the
database, the launcher, the dry-run plan, refusals; and on ejabberd/Prosody the TLS checks,
XEP-0133 provisioning, readiness and verify's Capsule exchange."""

from __future__ import annotations

import asyncio
import pwd
import secrets
import shutil
import ssl
import subprocess
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from capsule_ca import Authority
from capsule_openfire import database, keystore, ready, render
from capsule_openfire.cli import main as setup_main
from capsule_openfire.config import Config, ConfigError
from capsule_openfire.install import Installer, InstallError, service_for
from capsule_openfire.service import Launcher, Systemd, has_systemd
from capsule_openfire.service_admin import (
    ADD_USER,
    CHANGE_PASSWORD,
    DELETE_USER,
    AdminCommandError,
    ServiceAdmin,
)
from capsule_openfire.verify import (
    exchange,
    inband_registration_open,
    starttls_required,
    tls_chain,
)
from capsule_stack.rows import wait_stored

from .openfire_fake import FakeOpenfireConsole

DATA = Path(__file__).parent / "data"


def write_config(tmp_path: Path, extra: str = "", name: str = "of.conf") -> Path:
    path = tmp_path / name
    path.write_text((DATA / "openfire.conf").read_text() + extra)
    return path


@pytest.mark.parametrize("password", ["plain", "a&b<c>d\"e'f", "ünïcødé ☃ & ]]>"])
def test_openfire_xml_is_well_formed_and_complete(tmp_path: Path, password: str) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("mode = local", f"mode = local\npassword = {password}"))
    config = Config.load(path)
    text = render.openfire_xml(config)
    root = ET.fromstring(text)
    get = root.findtext
    assert get("locale") == "en" and get("autosetup/locale") == "en" and get("autosetup/run") == "true"
    assert (get("autosetup/xmpp/domain"), get("autosetup/xmpp/fqdn")) == ("example.org",
                                                                          "xmpp.example.org")
    url = get("autosetup/database/defaultProvider/serverURL")
    assert url is not None
    assert url.startswith("jdbc:mysql://127.0.0.1:3306/openfire?") and "&characterEncoding" in url
    assert "&amp;characterEncoding" in text  # escaped in the file
    assert get("autosetup/database/defaultProvider/password") == password
    assert get("autosetup/database/defaultProvider/driver") == "com.mysql.cj.jdbc.Driver"
    assert get("autosetup/database/mode") == "standard"
    assert get("autosetup/admin/password") == config["openfire.admin_password"]
    assert [u.findtext("username") for u in root.findall("autosetup/users/*")] == ["alice", "bob"]
    assert get("autosetup/users/user1/email") == "alice@example.org"
    assert get("xmpp/client/tls/policy") == "required"
    assert get("xmpp/offline/type") == "store_and_drop" and get("xmpp/offline/quota") == "1048576"
    assert get("conversation/messageArchiving") == "true"
    assert get("register/inband") == "false"  # closed unless the config asks
    assert root.find("plugin") is None and "secret" not in text.lower()  # no REST, no secret
    assert root.find("xmpp/socket/ssl/client") is None  # 5.1.1 needs no TLS cap
    assert get("adminConsole/interface") == "127.0.0.1"
    assert root.find("adminConsole/access") is None
    stripped = ET.fromstring(render.without_autosetup(text))
    assert stripped.find("autosetup") is None and stripped.findtext("register/inband") == "false"


def test_old_openfire_gets_tls_capped_and_options_reach_the_xml(tmp_path: Path) -> None:
    """Openfire < 4.8 hangs after STARTTLS on TLS 1.3 (OF-2435): server and clients cap at 1.2."""
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("[openfire]", "[openfire]\nversion = 4.5.0\n"
                                             "inband_registration = true"))
    config = Config.load(path)
    assert config.tls_max == ssl.TLSVersion.TLSv1_2
    root = ET.fromstring(render.openfire_xml(config))
    assert root.findtext("xmpp/socket/ssl/client/protocols") == "TLSv1.2"
    assert root.findtext("register/inband") == "true"
    path.write_text(path.read_text().replace("[plugins]", "[plugins]\nrestapi = true\n"
                                             "restapi_file = /srv/restAPI.jar"))
    root = ET.fromstring(render.openfire_xml(Config.load(path)))
    assert root.findtext("plugin/restapi/httpAuth") == "basic"  # the admin's login, no secret
    assert root.find("plugin/restapi/secret") is None
    assert root.findtext("adminConsole/access/allow-wildcards-in-excludes") == "true"
    path.write_text(path.read_text().replace("version = 4.5.0", "version = 5.1.1\ntls_max = 1.2"))
    assert Config.load(path).tls_max == ssl.TLSVersion.TLSv1_2
    path.write_text(path.read_text().replace("tls_max = 1.2", "tls_max = 1.1"))
    with pytest.raises(ConfigError, match=r"tls_max must be one of auto, 1\.2, 1\.3"):
        Config.load(path)


def test_secrets_are_generated_once_and_kept_private(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    first = Config.load(path)
    secrets_file = tmp_path / "of.conf.secrets"
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    again = Config.load(path)
    assert first.secret_values == again.secret_values and all(first.secret_values)
    assert len(set(first.secret_values)) == len(first.secret_values)
    secrets_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Config.load(path)


@pytest.mark.parametrize(("extra", "message"), [
    ("\n[openfire]\n", "already exists"),
    ("\n[oops]\nx = 1\n", "unknown section \\[oops\\]"),
    ("[tls]\nsecrett = x\n", "unknown key 'secrett' in \\[tls\\]"),
    ("\n[rest]\nsecret = x\n", "unknown section \\[rest\\]"),  # the REST secret is gone
    ("[plugins]\nmonitoring = yes\n", "monitoring must be true or false"),
    ("[openfire]\ninband_registration = 1\n", "inband_registration must be true or false"),
    ("[tls]\nca_dir = /x\n[openfire]\n", "already exists"),
])
def test_invalid_config_is_refused(tmp_path: Path, extra: str, message: str) -> None:
    path = write_config(tmp_path)
    section = extra.partition("\n")[0]
    text = path.read_text()
    path.write_text(text.replace(section + "\n", extra, 1) if section in text else text + extra)
    with pytest.raises(ConfigError, match=message):
        Config.load(path)
    assert not (tmp_path / "of.conf.secrets").exists()


def test_missing_required_key(tmp_path: Path) -> None:
    path = tmp_path / "of.conf"
    path.write_text("[openfire]\ndomain = example.org\n")
    with pytest.raises(ConfigError, match=r"fqdn is required"):
        Config.load(path)


def test_dry_run_plan_matches_the_reviewed_snapshot(tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path)
    assert setup_main(["install", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "of.conf.secrets").exists()  # a dry run writes nothing
    config = Config.load(path, generate=False)
    for secret in config.secret_values:
        assert secret not in out
    snapshot = (DATA / "openfire-dry-run.txt").read_text()
    assert out == snapshot, "dry-run plan changed: review it and update tests/data/openfire-dry-run.txt"


def test_refusals_before_any_change(tmp_path: Path) -> None:
    package = tmp_path / "openfire_5_1_1.tar.gz"
    package.write_bytes(b"not really openfire")
    for name in ("monitoring.jar", "restAPI.jar"):
        (tmp_path / name).write_bytes(b"jar")
    existing = tmp_path / "opt-openfire"
    existing.mkdir()
    text = (DATA / "openfire.conf").read_text().replace("/srv/downloads", str(tmp_path))
    text = text.replace("[openfire]", f"[openfire]\ninstall_dir = {existing}\nsha256 = {'0' * 64}")
    path = tmp_path / "of.conf"
    path.write_text(text)
    installer = Installer(Config.load(path))
    before = sorted(installer.work.rglob("*")) if installer.work.exists() else None
    errors = {what: check() or "" for what, check in installer.checks()}  # "": the check passed
    assert "an Openfire is installed" in errors["no Openfire installed yet"]
    assert "checksum mismatch" in errors["packages and checksums"]
    assert "is not a capsule-ca directory" in errors["our CA"]
    with pytest.raises(InstallError, match="refused"):
        installer.preflight()
    assert (sorted(installer.work.rglob("*")) if installer.work.exists() else None) == before
    assert Installer(Config.load(path), force=True).checks()[3][1]() is None  # --force
    external = text.replace("mode = local", "mode = external\nport = 1")
    path.write_text(external)
    error = dict(Installer(Config.load(path)).checks())["database reachable"]()
    assert error and "unreachable" in error
    path.write_text(text.replace(f"sha256 = {'0' * 64}\n", "").replace(
        f"package = {package}\n", ""))
    error = dict(Installer(Config.load(path)).checks())["packages and checksums"]()
    assert error and "no package given and no SHA-256" in error


def test_keytool_import_of_a_capsule_ca_server_certificate(tmp_path: Path) -> None:
    if not shutil.which("keytool"):
        pytest.fail("keytool missing: apt-get install openjdk-17-jre-headless (./scripts/test does)")
    ca = Authority.init(tmp_path / "ca", "Openfire CA", b"keytool test")
    files = ca.issue_server("example.org", tmp_path / "tls", fqdn="xmpp.example.org")
    security = tmp_path / "security"
    for _ in range(2):  # a second import replaces, never duplicates
        keystore.import_server_cert(files.key, files.chain, ca.root_path, security, "example.org")
    listing = keystore.listing(security / "keystore")
    assert "example.org" in listing and "PrivateKeyEntry" in listing and "Keystore type: JKS" in listing
    assert "Your keystore contains 1 entry" in listing
    trust = keystore.listing(security / "client.truststore")
    assert "capsule-root" in trust and "trustedCertEntry" in trust
    chain = subprocess.run(["keytool", "-list", "-v", "-keystore", str(security / "keystore"),
                            "-storepass", keystore.STORE_PASSWORD], capture_output=True, text=True,
                           check=True).stdout
    assert "Certificate chain length: 2" in chain and "xmpp.example.org" in chain


@pytest.mark.parametrize("xmpp_stack", ["ejabberd"], indirect=True)
def test_database_and_user_on_real_mariadb(xmpp_stack, tmp_path: Path) -> None:
    password = "pw with ' and \\ and &"
    sql = database.create_sql("openfire_setup_test", "of_user", password, ("localhost", "127.0.0.1"))
    xmpp_stack.sql(sql)
    xmpp_stack.sql(sql)  # idempotent
    options = tmp_path / "user.cnf"
    options.write_text(f"[client]\nuser=of_user\npassword=\"{password.replace(chr(92), chr(92) * 2)}\"\n"
                       f"host=127.0.0.1\nport={xmpp_stack.info.db_port}\ndatabase=openfire_setup_test\n")
    out = database.run_sql(
        [f"--defaults-extra-file={options}"],
        "CREATE TABLE t (k VARCHAR(255) NOT NULL, v TEXT, PRIMARY KEY (k), INDEX (v(255))) "
        "ROW_FORMAT=DYNAMIC; INSERT INTO t VALUES ('☃ snow', '😀 emoji'); "
        "SELECT v FROM t WHERE k = '☃ snow'; "
        "SELECT @@character_set_database, @@collation_database;")
    assert "😀 emoji" in out and "utf8mb4\tutf8mb4_unicode_ci" in out
    with pytest.raises(database.DatabaseError, match="denied"):
        database.run_sql([f"--defaults-extra-file={options}"], "CREATE DATABASE other_db;")
    with pytest.raises(database.DatabaseError, match="refusing"):
        database.create_sql("bad;name", "u", "p", ("%",))


async def test_tls_checks_against_a_real_server(xmpp_stack) -> None:
    state = xmpp_stack.info
    ok, detail = starttls_required("127.0.0.1", state.c2s_port, state.domain)
    assert ok, detail
    ok, detail = tls_chain("127.0.0.1", state.c2s_port, state.domain, state.ca_root,
                           f"xmpp.{state.domain}")
    assert ok and state.domain in detail, detail
    ok, detail = tls_chain("127.0.0.1", state.c2s_port, state.domain, state.ca_root,
                           "chat.elsewhere.example")
    assert not ok and "missing chat.elsewhere.example" in detail
    other = Authority.init(Path(state.dir) / "other-ca", "Other", b"other passphrase")
    ok, detail = tls_chain("127.0.0.1", state.c2s_port, state.domain, other.root_path)
    assert not ok and "TLS failed" in detail


async def test_xep0133_provisioning_on_a_real_server(xmpp_stack, new_account) -> None:
    """The same provisioning code Openfire gets, against ejabberd (mod_configure) and Prosody
    (mod_admin_adhoc): create, idempotent rerun, password reset, delete; a non-admin is refused."""
    state = xmpp_stack.info
    name = f"prov-{secrets.token_hex(3)}"

    def admin_session(jid: str, password: str) -> ServiceAdmin:
        return ServiceAdmin(jid, password, "127.0.0.1", state.c2s_port, state.ca_root)

    async with admin_session(f"admin@{state.domain}", state.admin_password) as admin:
        assert {ADD_USER, DELETE_USER, CHANGE_PASSWORD} <= await admin.commands()
        assert str(await admin.ensure_user(name, "first password")) == f"changed   user {name} created"
        assert not (await admin.ensure_user(name, "first password")).changed  # rerun: no write
        assert await admin.can_log_in(name, "first password")
        assert (await admin.ensure_user(name, "second password")).what.endswith("password reset")
        assert not await admin.can_log_in(name, "first password")
        assert await admin.can_log_in(name, "second password")
        if xmpp_stack.info.server == "ejabberd":  # Prosody 0.12 offers neither command
            assert f"{name}@{state.domain}" in await admin.list_users()
            assert await admin.count_users() >= 3  # probe, admin, the new user
        else:
            with pytest.raises(AdminCommandError) as unsupported:
                await admin.count_users()
            assert unsupported.value.condition == "unsupported"
        await admin.delete_user(name)
        assert not await admin.can_log_in(name, "second password")
        with pytest.raises(AdminCommandError):  # an invalid JID is refused, never ignored
            await admin.add_user("bad user@x", "pw")
    plain = new_account("notadmin")
    async with admin_session(plain.jid, plain.password) as user:
        with pytest.raises(AdminCommandError) as refused:
            await user.add_user(f"{name}-x", "pw")
        assert refused.value.condition in ("forbidden", "item-not-found", "error-note")
        assert not await user.can_log_in(f"{name}-x", "pw")


FAKE_OPENFIRE_SH = """#!/bin/sh
# A FAKE bin/openfire.sh (Openfire cannot run in CI): like the real one it runs in the
# foreground; it starts a child like java would, logs, and waits.
echo "fake openfire starting as $(id -un)"
sleep 300 &
echo "child $!"
wait
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_launcher_without_systemd_pid_file_log_and_stop(tmp_path: Path) -> None:
    install_dir = tmp_path / "opt/openfire"
    (install_dir / "bin").mkdir(parents=True)
    (install_dir / "bin/openfire.sh").write_text(FAKE_OPENFIRE_SH)  # not +x, like the live copy
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("service = systemd", f"service = auto\nuser = root\n"
                                                                  f"install_dir = {install_dir}"))
    config = Config.load(path)
    assert not has_systemd(tmp_path)
    launcher = service_for(config, tmp_path)
    assert isinstance(launcher, Launcher)
    launcher.pid_file, launcher.install_dir = tmp_path / "run/openfire.pid", install_dir
    launcher.log_file = install_dir / "logs/launcher.log"
    launcher.start()
    pid = launcher.pid()
    assert pid and int(launcher.pid_file.read_text()) == pid
    launcher.start()  # already running: no second copy
    assert launcher.pid() == pid
    deadline = time.monotonic() + 30
    while "child" not in launcher.log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = launcher.log_file.read_text()
    assert "child" in log, log
    child = int(log.split("child ")[1].split()[0])
    assert f"PID {pid}" in launcher.status()
    launcher.stop()
    assert launcher.pid() is None and not launcher.pid_file.exists()
    assert not _running(child)  # the whole process group ended, not only openfire.sh
    # a PID file naming some other process is not ours: never signalled, just cleaned
    other = subprocess.Popen(["sleep", "30"])
    try:
        launcher.pid_file.write_text(f"{other.pid}\n")
        assert launcher.pid() is None
        launcher.stop()
        assert other.poll() is None and not launcher.pid_file.exists()
    finally:
        other.kill()
        other.wait()
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    assert isinstance(service_for(config, tmp_path), Systemd)


def test_install_files_for_a_server_that_survives_restarts(tmp_path: Path) -> None:
    """Missing parent directories are created; openfire.xml is written 0600 and owned by the
    service user (root-owned, Openfire fell back to setup mode at its next start)."""
    top = tmp_path / "src/openfire"
    (top / "conf").mkdir(parents=True)
    (top / "conf/openfire.xml").write_text("<jive/>")
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("[openfire]", "[openfire]\nuser = nobody\n"
                                             "install_dir = /deep/missing/parents/openfire"))
    installer = Installer(Config.load(path), root=tmp_path / "root")
    installer.work.mkdir(parents=True)
    with tarfile.open(installer.work / installer.tarball, "w:gz") as tar:
        tar.add(top, arcname="openfire")
    installer._unpack()
    assert (installer.dir / "conf/openfire.xml").read_text() == "<jive/>"
    installer._write_conf()
    conf = installer.dir / "conf/openfire.xml"
    nobody = pwd.getpwnam("nobody")
    assert (conf.stat().st_uid, conf.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert conf.stat().st_mode & 0o777 == 0o600
    assert ET.fromstring(conf.read_text()).findtext("autosetup/run") == "true"


async def test_readiness_and_verify_exchange_on_a_real_server(xmpp_stack, tmp_path: Path) -> None:
    """verify's Capsule exchange (users over XEP-0133, online + offline) and the readiness
    login, against ejabberd and Prosody; only Openfire's tables stay Openfire-only."""
    state = xmpp_stack.info
    path = tmp_path / "of.conf"
    path.write_text(f"[openfire]\ndomain = {state.domain}\nfqdn = xmpp.{state.domain}\n"
                    f"admin_password = {state.admin_password}\n[tls]\nca_dir = {state.ca_dir}\n")
    config = Config.load(path)
    assert await asyncio.to_thread(ready.admin_login, config, "127.0.0.1", state.c2s_port) is None
    path.write_text(path.read_text().replace(state.admin_password, "not the password"))
    reason = await asyncio.to_thread(ready.admin_login, Config.load(path), "127.0.0.1",
                                     state.c2s_port)
    assert reason and "authentication failed" in reason
    queued: list[str] = []

    async def while_offline(username: str, text: str) -> None:
        (row,) = await wait_stored(xmpp_stack, "offline", username, containing="urn:capsule:")
        assert text not in row
        queued.append(username)

    authority = xmpp_stack.authority()
    admin = ServiceAdmin(f"admin@{state.domain}", state.admin_password, "127.0.0.1",
                         state.c2s_port, state.ca_root)
    async with admin:
        texts = await exchange(admin, authority, tmp_path, while_offline, say=lambda _: None)
        assert len(texts) == 2 and len(queued) == 1
        assert not await admin.can_log_in(queued[0], "anything")  # the users were removed
        # the test stacks allow in-band registration (loopback): verify's probe sees it open,
        # and the account it made is gone again (closed was seen on the live Openfire)
        assert await inband_registration_open(admin)
        if state.server == "ejabberd":
            assert not [j for j in await admin.list_users() if j.startswith("capsule-ibr-")]
    with pytest.raises(ready.NotReady, match="not running"):
        ready.wait_ready(config, alive=lambda: False)


def test_console_readiness_against_the_recorded_answers(tmp_path: Path) -> None:
    fake = FakeOpenfireConsole("pw", starting=True)
    try:
        assert ready.console_answers(fake.url) is None  # login.jsp answers even while starting
    finally:
        fake.close()
    reason = ready.console_answers(fake.url)
    assert reason and "not answering" in reason


def test_readme_commands_as_subprocesses(tmp_path: Path) -> None:
    """The README's openfire-setup commands, run the way a user runs them (--dry-run here)."""
    path = write_config(tmp_path)
    tools = Path(__file__).parent.parent / "openfire-setup"

    def run(*args: str) -> str:
        proc = subprocess.run([str(tools / args[0]), str(path), *args[1:]], capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "step 12: check the seeded properties in ofProperty" in run("install", "--dry-run")
    assert run("provision", "--dry-run", "apply").splitlines() == ["would apply alice",
                                                                   "would apply bob"]
    assert "XEP-0133" in run("verify", "--dry-run")
    assert run("service", "--dry-run", "restart").strip() == "systemd unit openfire.service"
    assert not (tmp_path / "of.conf.secrets").exists()
    bad = subprocess.run([str(tools / "provision"), str(path), "user-add"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "user-add needs a name" in bad.stderr
