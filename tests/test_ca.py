"""capsule-ca, checked with independent tools: the openssl CLI, cryptography and pyOpenSSL."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

from capsule.xmppaddr import ID_ON_XMPPADDR, cert_jids
from capsule_ca import Authority, CAError
from capsule_ca.cli import main as ca_main
from capsule_ca.profiles import Usage, render_extfile

from .helpers import rsa_key

PASS = b"correct horse battery"


def make_csr(jid: str | None = None, bits: int = 2048, email: str | None = None) -> bytes:
    key = rsa.generate_private_key(65537, bits)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whatever")])
    )
    names: list[x509.GeneralName] = []
    if jid:
        names.append(x509.OtherName(ID_ON_XMPPADDR, b"\x0c" + bytes([len(jid)]) + jid.encode()))
    if email:
        names.append(x509.RFC822Name(email))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def openssl_verify(ca: Authority, cert: Path, crl: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(ca.root_path)]
    if crl:
        args += ["-crl_check", "-CRLfile", str(ca.crl_path)]
    return subprocess.run([*args, str(cert)], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority.init(tmp_path_factory.mktemp("ca") / "ca", "Capsule Test", PASS)


def test_root_is_a_constrained_self_signed_ca(ca: Authority) -> None:
    root = x509.load_pem_x509_certificate(ca.root_pem)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert rsa_key(root).key_size == 3072
    key_pem = (ca.dir / "private/root.key").read_bytes()
    assert b"ENCRYPTED" in key_pem
    assert (ca.dir / "private/root.key").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("usage", "digital", "non_rep", "key_enc", "eku"),
    [
        (Usage.SIGN, True, True, False, None),
        (Usage.ENCRYPT, False, False, True, None),
        (Usage.CLIENT, True, False, False, ExtendedKeyUsageOID.CLIENT_AUTH),
    ],
)
def test_user_certificate_binds_jid_with_usage(
    ca: Authority, tmp_path: Path, usage: Usage, digital: bool, non_rep: bool, key_enc: bool,
    eku: x509.ObjectIdentifier | None,
) -> None:
    jid = f"{usage.value}-user@capsule.test"
    record = ca.issue(make_csr(), jid, usage, email=f"{usage.value}@example.org")
    cert = x509.load_pem_x509_certificate(record.pem())
    assert cert_jids(cert) == [jid]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == [f"{usage.value}@example.org"]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (ku.digital_signature, ku.content_commitment, ku.key_encipherment) == (
        digital, non_rep, key_enc)
    if eku:
        assert eku in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    path = tmp_path / "cert.pem"
    path.write_bytes(record.pem())
    result = openssl_verify(ca, path)
    assert result.returncode == 0, result.stderr


def test_server_certificate_names_domain_and_fqdn(ca: Authority, tmp_path: Path) -> None:
    files = ca.issue_server("capsule.test", tmp_path, fqdn="xmpp.capsule.test", ips=["127.0.0.1"])
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["capsule.test", "xmpp.capsule.test"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert openssl_verify(ca, files.cert).returncode == 0
    assert files.chain.read_bytes().endswith(ca.root_pem)
    assert files.key.stat().st_mode & 0o077 == 0


def test_revocation_fails_verification_for_that_certificate_only(ca: Authority, tmp_path: Path
                                                                 ) -> None:
    keep = ca.issue(make_csr(), "keep@capsule.test", Usage.SIGN)
    gone = ca.issue(make_csr(), "gone@capsule.test", Usage.SIGN)
    ca.revoke(serial=gone.serial)
    ca.gencrl()
    keep_path, gone_path = tmp_path / "keep.pem", tmp_path / "gone.pem"
    keep_path.write_bytes(keep.pem())
    gone_path.write_bytes(gone.pem())
    assert openssl_verify(ca, keep_path, crl=True).returncode == 0
    revoked = openssl_verify(ca, gone_path, crl=True)
    assert revoked.returncode != 0 and "revoked" in revoked.stdout + revoked.stderr
    # pyOpenSSL's X509Store with the CRL agrees
    store = crypto.X509Store()
    store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, ca.root_pem))
    store.add_crl(x509.load_pem_x509_crl(ca.crl_path.read_bytes()))
    store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    crypto.X509StoreContext(store, crypto.load_certificate(crypto.FILETYPE_PEM, keep.pem())
                            ).verify_certificate()
    with pytest.raises(crypto.X509StoreContextError, match="revoked"):
        crypto.X509StoreContext(store, crypto.load_certificate(crypto.FILETYPE_PEM, gone.pem())
                                ).verify_certificate()
    status = {r.serial: r.status for r in ca.records()}
    assert status[gone.serial] == "revoked" and status[keep.serial] == "valid"


def test_second_certificate_for_same_jid_and_usage(ca: Authority) -> None:
    first = ca.issue(make_csr(), "twice@capsule.test", Usage.ENCRYPT)
    with pytest.raises(CAError, match="already has a valid encrypt certificate"):
        ca.issue(make_csr(), "twice@capsule.test", Usage.ENCRYPT)
    second = ca.issue(make_csr(), "twice@capsule.test", Usage.ENCRYPT, replace=True)
    status = {r.serial: r.status for r in ca.records()}
    assert status[first.serial] == "revoked" and status[second.serial] == "valid"


@pytest.mark.parametrize(
    ("csr", "jid", "message"),
    [
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
         "x@capsule.test", "not a PEM certificate request"),
        (b"garbage", "x@capsule.test", "not a PEM certificate request"),
        (None, "alice@capsule.test", "asks for mallory@capsule.test"),
        (None, "alice/res@capsule.test", "not a bare JID"),
    ],
)
def test_bad_input_leaves_directory_unchanged(ca: Authority, csr: bytes | None, jid: str,
                                              message: str) -> None:
    before = snapshot(ca.dir)
    with pytest.raises(CAError, match=message):
        ca.issue(csr or make_csr("mallory@capsule.test"), jid, Usage.SIGN)
    assert snapshot(ca.dir) == before


def test_small_key_and_wrong_passphrase_and_unknown_serial(ca: Authority) -> None:
    before = snapshot(ca.dir)
    with pytest.raises(CAError, match="at least 2048 bits"):
        ca.issue(make_csr(bits=1024), "small@capsule.test", Usage.SIGN)
    with pytest.raises(CAError, match="wrong CA passphrase"):
        Authority(ca.dir, b"wrong passphrase").issue(make_csr(), "w@capsule.test", Usage.SIGN)
    with pytest.raises(CAError, match="no certificate with serial"):
        ca.revoke(serial="DEADBEEF")
    assert snapshot(ca.dir) == before


def test_failure_after_openssl_wrote_rolls_back(ca: Authority, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """A failure after openssl revoked the old and signed the new certificate restores every file."""
    ca.issue(make_csr(), "rollback@capsule.test", Usage.SIGN)
    before = snapshot(ca.dir)
    real_sign = Authority._sign

    def sign_then_fail(self: Authority, *args: Any, **kwargs: Any) -> None:
        real_sign(self, *args, **kwargs)
        raise CAError("simulated crash after signing")

    monkeypatch.setattr(Authority, "_sign", sign_then_fail)
    with pytest.raises(CAError, match="simulated crash"):
        ca.issue(make_csr(), "rollback@capsule.test", Usage.SIGN, replace=True)
    assert snapshot(ca.dir) == before
    assert [r.status for r in ca.records() if r.subject == "rollback@capsule.test"] == ["valid"]


def test_validity_window_checked_before_anything(ca: Authority) -> None:
    import datetime as dt

    with pytest.raises(CAError, match="must end after it starts"):
        ca.issue(make_csr(), "later@capsule.test", Usage.SIGN,
                 not_before=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
                 not_after=dt.datetime(2029, 1, 1, tzinfo=dt.UTC))


def test_concurrent_issuance_keeps_index_consistent(ca: Authority) -> None:
    csrs = [make_csr() for _ in range(6)]
    errors: list[BaseException] = []

    def issue(i: int) -> None:
        try:
            Authority(ca.dir, PASS).issue(csrs[i], f"conc{i}@capsule.test", Usage.SIGN)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=issue, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    records = [r for r in ca.records() if r.subject.startswith("conc")]
    assert sorted(r.subject for r in records) == [f"conc{i}@capsule.test" for i in range(6)]
    assert len({r.serial for r in ca.records()}) == len(ca.records())
    for r in records:
        assert cert_jids(x509.load_pem_x509_certificate(r.pem())) == [r.subject]


def test_cli_round_trip_and_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pw = tmp_path / "pw"
    pw.write_text("cli passphrase\n")
    ca_dir = str(tmp_path / "ca")
    common = ["--passphrase-file", str(pw)]
    assert ca_main(["init", ca_dir, "--name", "CLI CA", *common]) == 0
    csr = tmp_path / "req.pem"
    csr.write_bytes(make_csr("bob@capsule.test"))
    out = tmp_path / "bob.pem"
    assert ca_main(["issue", ca_dir, "--csr", str(csr), "--jid", "bob@capsule.test",
                    "--usage", "sign", "--out", str(out), *common]) == 0
    capsys.readouterr()
    assert ca_main(["issue", ca_dir, "--csr", str(tmp_path / "missing.pem"), "--jid",
                    "bob@capsule.test", "--usage", "sign", *common]) == 1
    err = capsys.readouterr().err
    assert err.startswith("capsule-ca: error: cannot read CSR") and err.count("\n") == 1
    monkeypatch.setenv("CAPSULE_CA_PASSPHRASE", "cli passphrase")
    assert ca_main(["revoke", ca_dir, "--jid", "bob@capsule.test"]) == 0
    assert ca_main(["list", ca_dir]) == 0
    listing = capsys.readouterr().out
    assert "bob@capsule.test" in listing and "revoked" in listing and "sign" in listing


# -- JIDs (RFC 7622) and UTF-8 -------------------------------------------------------------
CYRILLIC = "\u0430lice@capsule.test"  # Cyrillic small a, not Latin a: another account


def test_non_ascii_jid_is_certified_as_itself_and_one_per_usage_holds(ca: Authority) -> None:
    first = ca.issue(make_csr(), CYRILLIC, Usage.SIGN)
    cert = x509.load_pem_x509_certificate(first.pem())
    assert cert_jids(cert) == [CYRILLIC]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CYRILLIC
    assert first.subject == CYRILLIC and ca.valid_for(CYRILLIC) == [first]
    assert ca.valid_for("alice@capsule.test") == []
    with pytest.raises(CAError, match="already has a valid sign certificate"):
        ca.issue(make_csr(), CYRILLIC, Usage.SIGN)
    second = ca.issue(make_csr(), CYRILLIC, Usage.SIGN, replace=True)
    status = {r.serial: r.status for r in ca.records()}
    assert status[first.serial] == "revoked" and status[second.serial] == "valid"
    assert [r.serial for r in ca.revoke(jid=CYRILLIC)] == [second.serial]


def test_a_spelling_of_a_jid_is_the_same_account(ca: Authority) -> None:
    record = ca.issue(make_csr("Bob@Capsule.Test"), "BOB@capsule.TEST", Usage.ENCRYPT)
    assert cert_jids(x509.load_pem_x509_certificate(record.pem())) == ["bob@capsule.test"]
    assert ca.valid_for("bob@CAPSULE.test") == [record]
    with pytest.raises(CAError, match="already has a valid encrypt certificate"):
        ca.issue(make_csr(), "bob@capsule.test", Usage.ENCRYPT)
    assert [r.serial for r in ca.revoke(jid="Bob@capsule.test")] == [record.serial]


def test_issued_name_is_read_back_or_nothing_is_issued(ca: Authority,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """openssl certifying a name other than the one asked for must leave no certificate."""
    import capsule_ca.authority as authority

    before = snapshot(ca.dir)
    real = render_extfile  # what authority calls, before the patch

    def mangled(usage: Usage, san: list[tuple[str, str]]) -> str:
        return real(usage, [(kind, value.replace("mangled", "mallory")) for kind, value in san])

    monkeypatch.setattr(authority, "render_extfile", mangled)
    with pytest.raises(CAError, match="nothing issued"):
        ca.issue(make_csr(), "mangled@capsule.test", Usage.SIGN)
    assert snapshot(ca.dir) == before
    assert ca.valid_for("mangled@capsule.test") == []


def capsule_ca(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `capsule-ca` command as a user runs it."""
    import os
    import sys

    exe = Path(sys.executable).with_name("capsule-ca")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})


def test_cli_issues_for_the_normalised_jid_and_keeps_the_passphrase_from_openssl(
        tmp_path: Path) -> None:
    """`capsule-ca issue --jid Alice@Capsule.Test` certifies alice@capsule.test (what clients
    compare), and no openssl child sees $CAPSULE_CA_PASSPHRASE in its environment."""
    import os
    import shutil

    spy = tmp_path / "bin"
    spy.mkdir()
    envs = tmp_path / "envs"
    envs.mkdir()
    real = shutil.which("openssl")
    (spy / "openssl").write_text(f'#!/bin/sh\nenv > "{envs}/$$"\nexec {real} "$@"\n')
    (spy / "openssl").chmod(0o755)
    secret = "cli passphrase in the environment"
    env = {"CAPSULE_CA_PASSPHRASE": secret, "PATH": f"{spy}:{os.environ['PATH']}"}
    ca_dir = str(tmp_path / "ca")
    assert capsule_ca("init", ca_dir, "--name", "Env CA", env=env).returncode == 0
    csr = tmp_path / "req.pem"
    csr.write_bytes(make_csr("alice@capsule.test"))  # what a client asks for its account
    out = tmp_path / "alice.pem"
    done = capsule_ca("issue", ca_dir, "--csr", str(csr), "--jid", "Alice@Capsule.Test",
                      "--usage", "sign", "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert "for alice@capsule.test" in done.stdout
    assert cert_jids(x509.load_pem_x509_certificate(out.read_bytes())) == ["alice@capsule.test"]
    assert capsule_ca("revoke", ca_dir, "--jid", "ALICE@capsule.test", env=env).returncode == 0
    seen = [p.read_text() for p in envs.iterdir()]
    assert len(seen) >= 5  # init, issue and revoke all ran openssl through the spy
    assert not any(secret in text or "CAPSULE_CA_PASSPHRASE" in text for text in seen)
    log = (Path(ca_dir) / "issuance.log").read_text()
    assert "operator\tissued sign" in log and "for alice@capsule.test" in log
    assert "operator\trevoked sign" in log and secret not in log


def test_issuance_log_is_outside_the_rollback(ca: Authority, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """A line the service appends while a CLI transaction runs survives that one's rollback."""
    real_sign = Authority._sign

    def sign_then_fail(self: Authority, *args: Any, **kwargs: Any) -> None:
        real_sign(self, *args, **kwargs)
        Authority(ca.dir).log("service@capsule.test", "issued encrypt serial 42 meanwhile")
        raise CAError("simulated crash after signing")

    monkeypatch.setattr(Authority, "_sign", sign_then_fail)
    with pytest.raises(CAError, match="simulated crash"):
        ca.issue(make_csr(), "logged@capsule.test", Usage.SIGN)
    log = (ca.dir / "issuance.log").read_text()
    assert log.endswith("\tservice@capsule.test\tissued encrypt serial 42 meanwhile\n")
    assert "logged@capsule.test" not in log  # nothing was issued
    assert ca.valid_for("logged@capsule.test") == []


# -- CRLs: a practical nextUpdate, renewed before they expire ----------------------------
def crl_life(ca: Authority) -> tuple[dt.datetime, dt.datetime]:
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.next_update_utc is not None
    return crl.last_update_utc, crl.next_update_utc


def test_crls_live_seven_days_by_default_and_renewal_is_due_at_half_life(tmp_path: Path
                                                                         ) -> None:
    ca = Authority.init(tmp_path / "ca", "CRL CA", PASS)
    last, nxt = crl_life(ca)
    assert nxt - last == dt.timedelta(days=7)
    assert not ca.crl_needs_renewal()
    assert not ca.crl_needs_renewal(last + dt.timedelta(days=3, hours=11))
    assert ca.crl_needs_renewal(last + dt.timedelta(days=3, hours=12))
    pw = tmp_path / "pw"
    pw.write_bytes(PASS)
    done = capsule_ca("crl", str(ca.dir), "--days", "2", "--passphrase-file", str(pw))
    assert done.returncode == 0, done.stderr
    last, nxt = crl_life(ca)
    assert nxt - last == dt.timedelta(days=2)
    assert capsule_ca("crl", str(ca.dir), "--days", "0", "--passphrase-file", str(pw)
                      ).returncode == 1
    short = Authority.init(tmp_path / "short", "Short CA", PASS, crl_days=1)
    last, nxt = crl_life(short)
    assert nxt - last == dt.timedelta(days=1)


def test_superseding_a_certificate_publishes_a_crl_listing_it(ca: Authority) -> None:
    old = ca.issue(make_csr(), "superseded@capsule.test", Usage.SIGN)
    ca.issue(make_csr(), "superseded@capsule.test", Usage.SIGN, replace=True)
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(old.serial, 16)) is not None


def test_an_enrollment_is_one_transaction(ca: Authority, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """Ctrl-C between the two signatures of a re-enrollment leaves the old pair valid and no
    file changed (not sign superseded and reissued, encrypt not)."""
    jid = "pair@capsule.test"
    first = ca.enroll({Usage.SIGN: make_csr(jid), Usage.ENCRYPT: make_csr(jid)}, jid, jid)
    before = snapshot(ca.dir)
    real_sign = Authority._sign
    signed: list[object] = []

    def interrupted_after_one(self: Authority, *args: Any, **kwargs: Any) -> object:
        if signed:
            raise KeyboardInterrupt
        signed.append(real_sign(self, *args, **kwargs))
        return signed[-1]

    monkeypatch.setattr(Authority, "_sign", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        ca.enroll({Usage.SIGN: make_csr(jid), Usage.ENCRYPT: make_csr(jid)}, jid, jid)
    assert signed and snapshot(ca.dir) == before
    assert {r.serial for r in ca.valid_for(jid)} == {r.serial for r in first.values()}
    monkeypatch.undo()
    second = ca.enroll({Usage.SIGN: make_csr(jid), Usage.ENCRYPT: make_csr(jid)}, jid, jid)
    assert {r.serial for r in ca.valid_for(jid)} == {r.serial for r in second.values()}
    revoked = {r.serial for r in ca.records() if r.subject == jid and r.status == "revoked"}
    assert revoked == {r.serial for r in first.values()}


def test_serve_with_a_wrong_passphrase_refuses_at_start(ca: Authority, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    proc = capsule_ca("serve", str(ca.dir), "--jid", "ca@capsule.test", "--passphrase-file",
                      str(wrong), env={"CAPSULE_CA_XMPP_PASSWORD": "unused"})
    assert proc.returncode == 1 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert proc.stderr == "capsule-ca: error: wrong CA passphrase (cannot unlock the root key)\n"
