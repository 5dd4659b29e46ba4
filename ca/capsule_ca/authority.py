"""The CA directory and the operations on it, each one locked and all-or-nothing.

Every change goes through ``openssl req``/``openssl ca`` so that the directory
stays a plain openssl CA that an operator can inspect with openssl alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from capsule.jids import bare_jid, same_jid
from capsule.xmppaddr import cert_jids, san_jids
from capsule_ca.errors import CAError, IdentityMismatch, UnsupportedKey
from capsule_ca.profiles import Usage, render_extfile

MIN_RSA_BITS = 2048
USER_DAYS = 365
SERVER_DAYS = 825
CRL_DAYS = 7  # a CRL's life (nextUpdate); `capsule-ca serve` renews it at half-life
LOG_NAME = "issuance.log"  # append-only, never part of a rollback
SERVE_LOCK = "serve.lock"  # held by `capsule-ca serve` for its life
# what openssl children must not inherit: they get the passphrase through a pipe only
_SECRET_ENV_PREFIX = "CAPSULE_"


@dataclass(frozen=True)
class CertRecord:
    """One line of the CA's ``index.txt``."""

    serial: str
    status: str  # "valid", "revoked" or "expired"
    subject: str  # the CN: a bare JID, or a domain for server certificates
    usage: str
    expires: dt.datetime
    path: Path

    def pem(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class ServerFiles:
    """What ``issue-server`` writes: the key, the certificate, cert+root, and cert+key."""

    key: Path
    cert: Path
    chain: Path
    combined: Path
    serial: str


def _asn1_time(value: str) -> dt.datetime:
    fmt = "%y%m%d%H%M%SZ" if len(value) == 13 else "%Y%m%d%H%M%SZ"
    return dt.datetime.strptime(value, fmt).replace(tzinfo=dt.UTC)


def _openssl_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y%m%d%H%M%SZ")


def _subject_field(subject: str, field: str) -> str:
    """A field of an ``index.txt`` subject; openssl writes non-ASCII UTF-8 bytes as ``\\xHH``."""
    for part in subject.split("/"):
        key, _, val = part.partition("=")
        if key == field:
            raw = re.sub(rb"\\x([0-9A-F]{2})", lambda m: bytes.fromhex(m[1].decode()),
                         val.encode())
            return raw.decode("utf-8", errors="replace")
    return ""


def _jid(jid: str) -> str:
    try:
        return bare_jid(jid)
    except ValueError as exc:
        raise CAError(str(exc)) from None


def _dn_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("/", "\\/").replace("+", "\\+")


class Authority:
    """A tier-one CA kept in ``directory``; ``passphrase`` unlocks the root key for signing."""

    def __init__(self, directory: str | os.PathLike[str], passphrase: bytes | None = None):
        self.dir = Path(directory).resolve()
        self._passphrase = passphrase
        if not (self.dir / "openssl.cnf").is_file() or not self.root_path.is_file():
            raise CAError(f"{self.dir} is not a CA directory (run `capsule-ca init` first)")

    # -- paths -----------------------------------------------------------------
    @property
    def root_path(self) -> Path:
        return self.dir / "root.pem"

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def root_pem(self) -> bytes:
        return self.root_path.read_bytes()

    # -- creation --------------------------------------------------------------
    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        name: str,
        passphrase: bytes,
        key_bits: int = 3072,
        days: int = 3650,
        crl_days: int = CRL_DAYS,
    ) -> Authority:
        """Create the directory layout, the encrypted root key and the self-signed root."""
        target = Path(directory).resolve()
        if len(passphrase) < 4:
            raise CAError("the CA passphrase must have at least 4 characters")
        if key_bits < 3072:
            raise CAError(f"the root key must have at least 3072 bits, not {key_bits}")
        if crl_days < 1:
            raise CAError(f"a CRL must live at least one day, not {crl_days}")
        if not name.strip() or any(c in name for c in "/\n\\"):
            raise CAError(f"bad CA name {name!r}")
        if target.exists() and any(target.iterdir()):
            raise CAError(f"{target} exists and is not empty; refusing to overwrite a CA")
        created = not target.exists()
        try:
            (target / "private").mkdir(parents=True, mode=0o700)
            (target / "newcerts").mkdir()
            template = resources.files("capsule_ca").joinpath("openssl.cnf.in").read_text()
            config = (
                template.replace("@DIR@", str(target).replace("$", "\\$"))
                .replace("@NAME@", name)
                .replace("@DAYS@", str(USER_DAYS))
                .replace("@CRL_DAYS@", str(crl_days))
            )
            (target / "openssl.cnf").write_text(config)
            (target / "index.txt").write_text("")
            (target / "index.txt.attr").write_text("unique_subject = no\n")
            (target / "serial").write_text(f"{secrets.randbits(62) | 1 << 62:016X}\n")
            (target / "crlnumber").write_text("01\n")
            _run_openssl(
                [
                    "req", "-new", "-x509", "-config", str(target / "openssl.cnf"),
                    "-newkey", f"rsa:{key_bits}", "-sha256", "-days", str(days),
                    "-extensions", "v3_root", "-keyout", str(target / "private/root.key"),
                    "-out", str(target / "root.pem"), "-passout", "fd:{fd}",
                ],
                passphrase,
            )
            os.chmod(target / "private/root.key", 0o600)
        except BaseException:
            if created:
                shutil.rmtree(target, ignore_errors=True)
            else:
                for child in target.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            raise
        authority = cls(target, passphrase)
        authority.gencrl()
        return authority

    # -- queries ---------------------------------------------------------------
    def records(self) -> list[CertRecord]:
        """Every certificate the CA has issued, in issuing order."""
        now = dt.datetime.now(dt.UTC)
        out = []
        for line in (self.dir / "index.txt").read_text().splitlines():
            fields = line.split("\t")
            if len(fields) != 6:
                continue
            flag, expiry, _revoked, serial, _file, subject = fields
            expires = _asn1_time(expiry)
            status = {"V": "valid", "R": "revoked", "E": "expired"}[flag]
            if status == "valid" and expires <= now:
                status = "expired"
            out.append(
                CertRecord(
                    serial=serial,
                    status=status,
                    subject=_subject_field(subject, "CN"),
                    usage=_subject_field(subject, "OU"),
                    expires=expires,
                    path=self.dir / "newcerts" / f"{serial}.pem",
                )
            )
        return out

    def valid_for(self, jid: str, usage: Usage | None = None) -> list[CertRecord]:
        """The valid certificates of ``jid`` (any spelling of it), of one usage or all."""
        jid = _jid(jid)
        return [
            r
            for r in self.records()
            if r.status == "valid" and r.subject == jid and (usage is None or r.usage == usage.value)
        ]

    def crl_needs_renewal(self, now: dt.datetime | None = None) -> bool:
        """True once half of the current CRL's life (thisUpdate to nextUpdate) has passed."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return True
        next_update = crl.next_update_utc
        if next_update is None:
            return True
        now = now or dt.datetime.now(dt.UTC)
        return now >= crl.last_update_utc + (next_update - crl.last_update_utc) / 2

    def log(self, who: str, what: str) -> None:
        """Append one line to ``issuance.log`` (never a secret); kept even when a transaction
        rolls back, since another process may have appended meanwhile."""
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        line = f"{stamp}\t{who}\t{what}\n".encode()
        fd = os.open(self.dir / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    # -- issuance --------------------------------------------------------------
    def issue(
        self,
        csr_pem: bytes,
        jid: str,
        usage: Usage,
        email: str | None = None,
        replace: bool = False,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        requester: str = "operator",
    ) -> CertRecord:
        """Certify the CSR's key for ``jid`` (SAN id-on-xmppAddr) with the key usage of ``usage``.

        ``jid`` is normalised (RFC 7622) first; the certificate names that form or none is issued.
        A superseded certificate is revoked and the CRL regenerated in the same transaction.
        """
        jid = self._check_request(csr_pem, jid, usage, email)
        if not_before and not_after and not_after <= not_before:
            raise CAError("the validity window must end after it starts")
        with self._transaction():
            record, existing = self._issue_locked(csr_pem, jid, usage, email, replace,
                                                  not_before, not_after)
            if existing:
                self._gencrl_locked()
        self._log_issued(requester, record, existing)
        return record

    def enroll(self, csrs: dict[Usage, bytes], jid: str, requester: str
               ) -> dict[Usage, CertRecord]:
        """Certify one key per usage for ``jid``, superseding its valid certificates, as one
        transaction: all are issued (and the old ones revoked) or nothing changes."""
        jid = _jid(jid)
        for usage, csr_pem in csrs.items():
            self._check_request(csr_pem, jid, usage, None)
        issued: dict[Usage, tuple[CertRecord, list[CertRecord]]] = {}
        with self._transaction():
            for usage, csr_pem in csrs.items():
                issued[usage] = self._issue_locked(csr_pem, jid, usage, None, True, None, None)
            if any(existing for _, existing in issued.values()):
                self._gencrl_locked()
        for record, existing in issued.values():
            self._log_issued(requester, record, existing)
        return {usage: record for usage, (record, _) in issued.items()}

    @staticmethod
    def _check_request(csr_pem: bytes, jid: str, usage: Usage, email: str | None) -> str:
        """The normalised JID, once the CSR and usage are fit to be certified for it."""
        if usage is Usage.SERVER:
            raise CAError("use issue-server for server certificates")
        jid = _jid(jid)
        _check_csr(csr_pem, jid, usage, email)
        return jid

    def _issue_locked(self, csr_pem: bytes, jid: str, usage: Usage, email: str | None,
                      replace: bool, not_before: dt.datetime | None,
                      not_after: dt.datetime | None) -> tuple[CertRecord, list[CertRecord]]:
        """Sign (inside a transaction); returns the record and the certificates it superseded
        (the caller regenerates the CRL once if there are any)."""
        san = [("xmpp", jid)] + ([("email", email)] if email else [])
        existing = self.valid_for(jid, usage)
        if existing and not replace:
            raise CAError(
                f"{jid} already has a valid {usage.value} certificate "
                f"(serial {existing[0].serial}); pass --replace to revoke it and issue anew"
            )
        for old in existing:
            self._revoke_locked(old, "superseded")
        return self._sign(csr_pem, usage, jid, san, not_before, not_after), existing

    def _log_issued(self, requester: str, record: CertRecord, existing: list[CertRecord]
                    ) -> None:
        superseded = "".join(f", superseded {old.serial}" for old in existing)
        self.log(requester,
                 f"issued {record.usage} serial {record.serial} for {record.subject}{superseded}")

    def issue_server(
        self,
        domain: str,
        out_dir: str | os.PathLike[str],
        fqdn: str | None = None,
        ips: Sequence[str] = (),
        key_bits: int = 2048,
    ) -> ServerFiles:
        """A TLS server key and certificate with SAN DNS for the domain (and FQDN), EKU serverAuth."""
        if not domain or any(c in domain for c in "/@ \t\n"):
            raise CAError(f"bad domain {domain!r}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = [("DNS", domain)] + ([("DNS", fqdn)] if fqdn and fqdn != domain else [])
        names += [("IP", ip) for ip in ips]
        with tempfile.TemporaryDirectory() as tmp:
            key, csr = Path(tmp) / "key.pem", Path(tmp) / "csr.pem"
            _run_openssl(
                [
                    "req", "-new", "-newkey", f"rsa:{key_bits}", "-nodes", "-keyout", str(key),
                    "-out", str(csr), "-subj", f"/CN={_dn_escape(domain)}",
                ]
            )
            with self._transaction():
                record = self._sign(csr.read_bytes(), Usage.SERVER, domain, names, None, None)
            files = ServerFiles(
                key=out / "server.key",
                cert=out / "server.crt",
                chain=out / "chain.pem",
                combined=out / "server.pem",
                serial=record.serial,
            )
            cert = record.pem()
            files.key.touch(mode=0o600)
            files.key.write_bytes(key.read_bytes())
            files.cert.write_bytes(cert)
            files.chain.write_bytes(cert + self.root_pem)
            files.combined.touch(mode=0o600)
            files.combined.write_bytes(cert + key.read_bytes())
        return files

    # -- revocation ------------------------------------------------------------
    def revoke(self, serial: str | None = None, jid: str | None = None,
               requester: str = "operator") -> list[CertRecord]:
        """Revoke one certificate by serial, or every valid certificate of a JID (any spelling);
        refresh the CRL."""
        if (serial is None) == (jid is None):
            raise CAError("give exactly one of --serial or --jid")
        jid = _jid(jid) if jid is not None else None
        with self._transaction():
            if serial is not None:
                wanted = serial.upper().lstrip("0")
                targets = [r for r in self.records() if r.serial.lstrip("0") == wanted]
                if not targets:
                    raise CAError(f"no certificate with serial {serial}")
                if targets[0].status == "revoked":
                    raise CAError(f"certificate {serial} is already revoked")
            else:
                targets = [r for r in self.records() if r.subject == jid and r.status == "valid"]
                if not targets:
                    raise CAError(f"no valid certificate for {jid}")
            for record in targets:
                self._revoke_locked(record, "unspecified")
            self._gencrl_locked()
        for record in targets:
            self.log(requester, f"revoked {record.usage} serial {record.serial} of {record.subject}")
        return targets

    def gencrl(self, lifetime: dt.timedelta | None = None) -> Path:
        """Write a fresh CRL signed by the root to ``crl.pem``, valid for ``lifetime`` (default:
        the CA's ``default_crl_days``, 7 for a new CA)."""
        if lifetime is not None and lifetime.total_seconds() < 1:
            raise CAError(f"a CRL must live at least a second, not {lifetime}")
        with self._transaction():
            self._gencrl_locked(lifetime)
        return self.crl_path

    # -- internals -------------------------------------------------------------
    def _need_passphrase(self) -> bytes:
        if self._passphrase is None:
            raise CAError("this operation needs the CA passphrase")
        return self._passphrase

    def check_passphrase(self) -> None:
        """Raise CAError unless the passphrase unlocks the root key."""
        try:
            _run_openssl(
                ["pkey", "-in", str(self.dir / "private/root.key"), "-passin", "fd:{fd}", "-noout"],
                self._need_passphrase(),
            )
        except CAError:
            raise CAError("wrong CA passphrase (cannot unlock the root key)") from None

    def _ca(self, args: list[str]) -> None:
        _run_openssl(
            ["ca", "-batch", "-config", str(self.dir / "openssl.cnf"), "-passin", "fd:{fd}", *args],
            self._need_passphrase(),
        )

    def _sign(
        self,
        csr_pem: bytes,
        usage: Usage,
        name: str,
        san: list[tuple[str, str]],
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
    ) -> CertRecord:
        serial = (self.dir / "serial").read_text().strip()
        with tempfile.TemporaryDirectory() as tmp:
            csr, ext, cert = Path(tmp) / "req.pem", Path(tmp) / "ext.cnf", Path(tmp) / "out.pem"
            csr.write_bytes(csr_pem)
            ext.write_text(render_extfile(usage, san))
            days = SERVER_DAYS if usage is Usage.SERVER else USER_DAYS
            validity = ["-days", str(days)]
            if not_before:
                validity += ["-startdate", _openssl_time(not_before)]
            if not_after:
                validity += ["-enddate", _openssl_time(not_after)]
            self._ca(
                [
                    "-notext", "-utf8", "-in", str(csr), "-out", str(cert), "-extfile", str(ext),
                    "-extensions", "leaf", "-subj",
                    f"/OU={usage.value}/CN={_dn_escape(name)}", *validity,
                ]
            )
        record = next((r for r in self.records() if r.serial == serial), None)
        if record is None:
            raise CAError(f"openssl ca did not record serial {serial}")
        self._check_issued(record, usage, name)
        return record

    @staticmethod
    def _check_issued(record: CertRecord, usage: Usage, name: str) -> None:
        """Read the new certificate back: it must name exactly what was asked, else the
        transaction rolls back (openssl mangling a name must never yield a usable certificate)."""
        if record.subject != name or record.usage != usage.value:
            raise CAError(f"openssl recorded {record.subject!r} ({record.usage}), not {name!r}; "
                          f"nothing issued")
        if usage is Usage.SERVER:
            return
        try:
            issued = cert_jids(x509.load_pem_x509_certificate(record.pem()))
        except ValueError as exc:
            raise CAError(f"the issued certificate's xmppAddr is unreadable ({exc}); "
                          f"nothing issued") from None
        if issued != [name]:
            raise CAError(f"the issued certificate names {issued}, not {name!r}; nothing issued")

    def _revoke_locked(self, record: CertRecord, reason: str) -> None:
        self._ca(["-revoke", str(record.path), "-crl_reason", reason])

    def _gencrl_locked(self, lifetime: dt.timedelta | None = None) -> None:
        with tempfile.NamedTemporaryFile(dir=self.dir, suffix=".tmp", delete=False) as tmp:
            pass
        life = ["-crlsec", str(int(lifetime.total_seconds()))] if lifetime else []
        try:
            self._ca(["-gencrl", "-out", tmp.name, *life])
            _run_openssl(["crl", "-in", tmp.name, "-noout"])  # refuse to publish a CRL openssl can't read
            os.replace(tmp.name, self.crl_path)
        finally:
            Path(tmp.name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Hold the CA lock; on any failure put every file back as it was (but the log, which
        other processes append to without the lock)."""
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.check_passphrase()
            outside = {self.dir / LOG_NAME, self.dir / ".lock", self.dir / SERVE_LOCK}
            before = {p: p.read_bytes() for p in self.dir.iterdir()
                      if p.is_file() and p not in outside}
            certs = set((self.dir / "newcerts").iterdir())
            try:
                yield
            except BaseException:
                for path in self.dir.iterdir():
                    if path.is_file() and path not in before and path not in outside:
                        path.unlink()
                for path, data in before.items():
                    path.write_bytes(data)
                for path in set((self.dir / "newcerts").iterdir()) - certs:
                    path.unlink()
                raise


def _check_csr(csr_pem: bytes, jid: str, usage: Usage, email: str | None) -> None:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CAError("the CSR is not a PEM certificate request") from None
    if not csr.is_signature_valid:
        raise CAError("the CSR's self-signature does not verify")
    key = csr.public_key()
    if usage is Usage.SIGN and isinstance(key, ed25519.Ed25519PublicKey):
        pass  # Ed25519 signs (wire format v1); it cannot encrypt or do TLS here
    elif not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_RSA_BITS:
        raise UnsupportedKey(f"the CSR must carry an RSA key of at least {MIN_RSA_BITS} bits"
                      + (" or an Ed25519 key" if usage is Usage.SIGN else ""))
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError as exc:
        raise CAError(f"the CSR has a malformed extension: {exc}") from None
    try:
        asked = san_jids(san)
    except ValueError as exc:
        raise CAError(f"the CSR's xmppAddr is malformed: {exc}") from None
    if any(not same_jid(j, jid) for j in asked):
        raise IdentityMismatch(f"the CSR asks for {', '.join(asked)} but the certificate is "
                               f"for {jid}")
    emails = san.get_values_for_type(x509.RFC822Name)
    if any(e != email for e in emails):
        raise IdentityMismatch(f"the CSR asks for e-mail {', '.join(emails)}, not "
                               f"{email or 'none'}")
    if san.get_values_for_type(x509.DNSName):
        raise CAError("a user CSR must not ask for DNS names")


def _run_openssl(args: list[str], secret: bytes | None = None) -> str:
    """Run ``openssl``; ``{fd}`` in args becomes a pipe carrying ``secret`` (never argv or env)."""
    read_fd = write_fd = -1
    try:
        if secret is not None:
            read_fd, write_fd = os.pipe()
            os.write(write_fd, secret + b"\n")
            os.close(write_fd)
            write_fd = -1
            args = [a.replace("{fd}", str(read_fd)) for a in args]
        proc = subprocess.run(
            ["openssl", *args],
            capture_output=True,
            text=True,
            pass_fds=(read_fd,) if read_fd >= 0 else (),
            env={k: v for k, v in os.environ.items() if not k.startswith(_SECRET_ENV_PREFIX)},
            check=False,
        )
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
        raise CAError(f"openssl {args[0]} failed: {detail.strip()}")
    return proc.stdout
