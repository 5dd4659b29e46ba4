"""Put our CA's server certificate into Openfire's keystore, and the CA root into its
client trust store, with openssl and keytool (JKS, store password ``changeit``)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

STORE_PASSWORD = "changeit"  # Openfire's default; the stores hold no secret beyond the key


class KeystoreError(Exception):
    pass


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise KeystoreError(f"{cmd[0]} {cmd[1]} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def import_commands(key: Path, chain: Path, ca_root: Path, security_dir: Path, alias: str,
                    p12: Path) -> list[list[str]]:
    """The commands, in order (shown as they are by --dry-run)."""
    keystore, truststore = security_dir / "keystore", security_dir / "client.truststore"
    return [
        ["openssl", "pkcs12", "-export", "-inkey", str(key), "-in", str(chain), "-name", alias,
         "-out", str(p12), "-passout", f"pass:{STORE_PASSWORD}"],
        ["keytool", "-importkeystore", "-noprompt", "-srckeystore", str(p12), "-srcstoretype",
         "PKCS12", "-srcstorepass", STORE_PASSWORD, "-destkeystore", str(keystore),
         "-deststoretype", "JKS", "-deststorepass", STORE_PASSWORD, "-destkeypass",
         STORE_PASSWORD, "-alias", alias],
        ["keytool", "-importcert", "-noprompt", "-keystore", str(truststore), "-storetype", "JKS",
         "-storepass", STORE_PASSWORD, "-alias", "capsule-root", "-file", str(ca_root)],
    ]


def import_server_cert(key: Path, chain: Path, ca_root: Path, security_dir: Path,
                       alias: str) -> None:
    """Replace ``alias`` in the keystore and ``capsule-root`` in the client trust store."""
    security_dir.mkdir(parents=True, exist_ok=True)
    for store, name in (("keystore", alias), ("client.truststore", "capsule-root")):
        path = security_dir / store
        if path.exists() and name in listing(path):
            _run(["keytool", "-delete", "-keystore", str(path), "-storepass", STORE_PASSWORD,
                  "-alias", name])
    with tempfile.TemporaryDirectory() as tmp:
        for cmd in import_commands(key, chain, ca_root, security_dir, alias, Path(tmp) / "s.p12"):
            _run(cmd)


def listing(store: Path) -> str:
    """``keytool -list`` of a store (aliases and entry types)."""
    return _run(["keytool", "-list", "-keystore", str(store), "-storepass", STORE_PASSWORD])
