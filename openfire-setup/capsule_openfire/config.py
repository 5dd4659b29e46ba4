"""The one configuration file of openfire-setup, and the secrets generated beside it.

An INI file; every key is documented in ``KEYS`` (and in README.md). Unknown sections or keys
are refused before anything happens. Secrets left empty are generated once and kept in
``<config>.secrets`` (mode 0600), so a rerun reuses them.
"""

from __future__ import annotations

import configparser
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from capsule.files import write_private

# section -> key -> (default, help); default None = required
KEYS: dict[str, dict[str, tuple[str | None, str]]] = {
    "openfire": {
        "domain": (None, "the XMPP domain"),
        "fqdn": (None, "the host's fully qualified name (the certificate names both)"),
        "version": ("5.1.1", "Openfire version to install"),
        "package": ("", "a local openfire_X_Y_Z.tar.gz instead of downloading"),
        "sha256": ("", "SHA-256 of the tarball (required when downloading; no upstream pin known)"),
        "install_dir": ("/opt/openfire", "where Openfire is unpacked"),
        "locale": ("en", "admin console locale (autosetup needs one)"),
        "admin_email": ("", "admin e-mail (default admin@DOMAIN)"),
        "admin_password": ("", "admin console password (generated when empty)"),
        "encryption_key": ("", "key Openfire encrypts stored secrets with (generated when empty)"),
        "offline_quota": ("1048576", "bytes of offline messages kept per user"),
        "console_interface": ("127.0.0.1", "interface the admin console binds to"),
        "user": ("openfire", "system user Openfire runs as (created when missing)"),
        "service": ("auto", "auto: systemd when the host runs it, else launcher (bin/openfire.sh "
                            "under a PID file); or systemd, launcher"),
        "inband_registration": ("false", "let anyone create an account over XMPP (XEP-0077)"),
        "tls_max": ("auto", "highest TLS version of Openfire's c2s and of our clients: auto "
                            "(1.2 before Openfire 4.8, which hangs on 1.3: OF-2435), 1.2, 1.3"),
    },
    "database": {
        "mode": ("local", "local: install MariaDB here; external: use host/port below"),
        "host": ("127.0.0.1", "database host"),
        "port": ("3306", "database port"),
        "name": ("openfire", "database name"),
        "user": ("openfire", "database user Openfire connects as"),
        "password": ("", "its password (generated when empty)"),
        "admin_dsn": ("", "external mode: mysql://root:PW@HOST:PORT/ to create database and user"),
    },
    "plugins": {
        "monitoring": ("true", "install the Monitoring (archiving) plugin"),
        "monitoring_version": ("2.7.0", "Monitoring (archiving) plugin version"),
        "monitoring_file": ("", "a local monitoring.jar instead of downloading"),
        "monitoring_sha256": ("", "SHA-256 of monitoring.jar (required when downloading)"),
        "restapi": ("false", "install the REST API plugin (basic auth as the admin; provisioning "
                             "does not need it)"),
        "restapi_version": ("1.12.0", "REST API plugin version"),
        "restapi_file": ("", "a local restAPI.jar instead of downloading"),
        "restapi_sha256": ("", "SHA-256 of restAPI.jar (required when downloading)"),
    },
    "tls": {
        "ca_dir": (None, "the capsule-ca directory that issues the server certificate"),
        "ca_passphrase_file": ("", "file with the CA passphrase (else $CAPSULE_CA_PASSPHRASE)"),
    },
}
USERS_SECTION = "users"  # name = Full Name <email>; passwords generated into the secrets file
SECRET_KEYS = {("openfire", "admin_password"), ("openfire", "encryption_key"),
               ("database", "password")}
BOOLEANS = {("openfire", "inband_registration"), ("plugins", "monitoring"), ("plugins", "restapi")}
CHOICES = {("openfire", "service"): ("auto", "systemd", "launcher"),
           ("openfire", "tls_max"): ("auto", "1.2", "1.3")}


class ConfigError(Exception):
    """The configuration is invalid; nothing was changed."""


@dataclass(frozen=True)
class User:
    username: str
    name: str
    email: str
    password: str


class Config:
    def __init__(self, path: Path, values: dict[str, dict[str, str]], users: list[User],
                 secrets_path: Path):
        self.path = path
        self.values = values
        self.users = users
        self.secrets_path = secrets_path

    def __getitem__(self, key: str) -> str:
        section, _, name = key.partition(".")
        return self.values[section][name]

    @property
    def db_url(self) -> str:
        v = self.values["database"]
        return (f"jdbc:mysql://{v['host']}:{v['port']}/{v['name']}?rewriteBatchedStatements=true"
                f"&characterEncoding=UTF-8&characterSetResults=UTF-8&serverTimezone=UTC")

    def flag(self, key: str) -> bool:
        return self[key] == "true"

    @property
    def version(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self["openfire.version"].split("."))

    @property
    def tls_max(self) -> ssl.TLSVersion | None:
        """The cap for our clients (None: no cap); ``auto`` caps at 1.2 before Openfire 4.8."""
        choice = self["openfire.tls_max"]
        if choice == "1.2" or (choice == "auto" and self.version < (4, 8)):
            return ssl.TLSVersion.TLSv1_2
        return None

    @property
    def secret_values(self) -> list[str]:
        return [self.values[s][k] for s, k in SECRET_KEYS] + [u.password for u in self.users]

    @classmethod
    def load(cls, path: str | os.PathLike[str], generate: bool = True) -> Config:
        """Read and check the file; fill secrets from (or generate into) the secrets file."""
        target = Path(path)
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep user names
        try:
            with open(target) as f:
                parser.read_file(f)
        except OSError as exc:
            raise ConfigError(f"cannot read {target}: {exc.strerror}") from None
        except configparser.Error as exc:
            raise ConfigError(f"{target}: {exc.message}") from None
        unknown = [s for s in parser.sections() if s not in KEYS and s != USERS_SECTION]
        if unknown:
            raise ConfigError(f"{target}: unknown section [{unknown[0]}]; known: "
                              f"{', '.join([*KEYS, USERS_SECTION])}")
        values: dict[str, dict[str, str]] = {}
        for section, keys in KEYS.items():
            given = dict(parser[section]) if parser.has_section(section) else {}
            for key in given:
                if key not in keys:
                    raise ConfigError(f"{target}: unknown key '{key}' in [{section}]; known: "
                                      f"{', '.join(keys)}")
            values[section] = {}
            for key, (default, _help) in keys.items():
                value = given.get(key, default)
                if value is None or (default is None and not value.strip()):
                    raise ConfigError(f"{target}: [{section}] {key} is required ({_help})")
                values[section][key] = value.strip()
        _check(values, target)
        secrets_path = target.with_name(target.name + ".secrets")
        stored = _read_secrets(secrets_path)
        changed = False
        for section, key in sorted(SECRET_KEYS):
            if not values[section][key]:
                name = f"{section}.{key}"
                if name not in stored:
                    stored[name] = secrets.token_urlsafe(18)
                    changed = True
                values[section][key] = stored[name]
        users = []
        for username, spec in (parser[USERS_SECTION].items()
                               if parser.has_section(USERS_SECTION) else []):
            match = re.fullmatch(r"\s*([^<]*?)\s*(?:<([^>]+)>)?\s*", spec)
            if not re.fullmatch(r"[a-z0-9._-]+", username) or not match:
                raise ConfigError(f"{target}: bad user line '{username} = {spec}'")
            name = f"user.{username}"
            if name not in stored:
                stored[name] = secrets.token_urlsafe(12)
                changed = True
            users.append(User(username, match.group(1) or username, match.group(2) or "",
                              stored[name]))
        if not values["openfire"]["admin_email"]:
            values["openfire"]["admin_email"] = f"admin@{values['openfire']['domain']}"
        if changed and generate:
            _write_secrets(secrets_path, stored)
        return cls(target, values, users, secrets_path)


def _check(values: dict[str, dict[str, str]], target: Path) -> None:
    domain = values["openfire"]["domain"]
    if not re.fullmatch(r"[a-z0-9.-]+", domain):
        raise ConfigError(f"{target}: [openfire] domain '{domain}' is not a host name")
    for key in ("offline_quota",):
        if not values["openfire"][key].isdigit():
            raise ConfigError(f"{target}: [openfire] {key} must be a number of bytes")
    if not values["database"]["port"].isdigit():
        raise ConfigError(f"{target}: [database] port must be a number")
    if values["database"]["mode"] not in ("local", "external"):
        raise ConfigError(f"{target}: [database] mode must be local or external")
    for section, key in sorted(BOOLEANS):
        if values[section][key] not in ("true", "false"):
            raise ConfigError(f"{target}: [{section}] {key} must be true or false")
    for (section, key), allowed in CHOICES.items():
        if values[section][key] not in allowed:
            raise ConfigError(f"{target}: [{section}] {key} must be one of {', '.join(allowed)}")
    if not re.fullmatch(r"\d+\.\d+\.\d+", values["openfire"]["version"]):
        raise ConfigError(f"{target}: [openfire] version must look like 5.1.1")


def _read_secrets(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path} is readable by others; chmod 600 it")
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _write_secrets(path: Path, stored: dict[str, str]) -> None:
    write_private(path, "".join(f"{k}={v}\n" for k, v in sorted(stored.items())).encode())
