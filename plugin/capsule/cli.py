"""``capsule``: manage the local profile (keys, certificates, PIN).

PINs come from a prompt (asked twice when new), else ``--pin-file``, else ``$CAPSULE_PIN``;
they are never echoed, logged or written anywhere but into the Argon2id derivation.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from capsule.errors import CapsuleError, ProfileError
from capsule.profile import PIN_ENV, Profile, check_pin
from capsule_ca.cli import run

NEW_PIN_ENV = "CAPSULE_NEW_PIN"


def _pin(file: str | None, env: str, prompt: str, confirm: bool) -> str:
    if file:
        try:
            return Path(file).read_text().strip()
        except OSError as exc:
            raise ProfileError(f"cannot read PIN file {file}: {exc.strerror}") from None
    if os.environ.get(env):
        return os.environ[env]
    if not sys.stdin.isatty():
        raise ProfileError(f"no PIN: use a terminal, a PIN file or ${env}")
    pin = getpass.getpass(f"{prompt}: ")
    if confirm:
        check_pin(pin)
        if getpass.getpass(f"{prompt} again: ") != pin:
            raise ProfileError("the two PINs differ")
    return pin


def _open(args: argparse.Namespace) -> Profile:
    return Profile.load(args.profile, _pin(args.pin_file, PIN_ENV, "PIN", confirm=False))


def cmd_init(args: argparse.Namespace) -> None:
    pin = _pin(args.pin_file, PIN_ENV, "New PIN (6+ digits) or passphrase", confirm=True)
    print("generating two RSA key pairs…", flush=True)
    profile = Profile.create(args.profile, args.jid, pin, email=args.email, key_bits=args.key_bits)
    base = Path(args.profile)
    for usage in ("sign", "encrypt"):
        csr = base.with_name(f"{base.name}.{usage}.csr")
        csr.write_bytes(profile.csr(usage))
        print(f"{usage:8} CSR: {csr}")
    print(f"profile for {args.jid} written to {base}. Have the CA certify both CSRs, e.g.\n"
          f"  capsule-ca issue CADIR --csr {base.name}.sign.csr --jid {args.jid} --usage sign "
          f"--out sign.pem\n"
          f"  capsule-ca issue CADIR --csr {base.name}.encrypt.csr --jid {args.jid} "
          f"--usage encrypt --out encrypt.pem\n"
          f"then: capsule profile import-cert --profile {base} sign.pem encrypt.pem CADIR/root.pem")


def cmd_import(args: argparse.Namespace) -> None:
    profile = _open(args)
    for name in args.certs:
        try:
            pem = Path(name).read_bytes()
        except OSError as exc:
            raise ProfileError(f"cannot read {name}: {exc.strerror}") from None
        print(f"{name}: stored as {profile.import_cert(pem)} certificate")
    profile.save()
    if profile.ready():
        print("profile is ready: keys, both certificates and the CA root are in place")


def cmd_show(args: argparse.Namespace) -> None:
    data = _open(args).data
    print(f"JID       {data.jid}" + (f" <{data.email}>" if data.email else ""))
    for label, pem in (("sign", data.signing_cert), ("encrypt", data.encryption_cert),
                       ("CA root", data.ca_root)):
        if not pem:
            print(f"{label:9} (missing)")
            continue
        cert = x509.load_pem_x509_certificate(pem.encode())
        fp = cert.fingerprint(hashes.SHA256()).hex()
        print(f"{label:9} SHA-256 {fp}  expires {cert.not_valid_after_utc:%Y-%m-%d}")
    print(f"contacts  {len(data.contacts)} pinned"
          + (f": {', '.join(sorted(data.contacts))}" if data.contacts else ""))
    print(f"retired   {len(data.retired)} encryption key(s) kept for old messages")


def cmd_change_pin(args: argparse.Namespace) -> None:
    profile = _open(args)
    profile.change_pin(_pin(args.new_pin_file, NEW_PIN_ENV, "New PIN", confirm=True))
    print(f"PIN of {args.profile} changed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    top = parser.add_subparsers(dest="group", required=True)
    prof = top.add_parser("profile", help="create and manage the local profile")
    sub = prof.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--profile", required=True, help="the profile file")
        p.add_argument("--pin-file", help=f"file holding the PIN (else ${PIN_ENV}, else a prompt)")
        return p

    p = command("init", "generate keys locally and write CSRs for the CA")
    p.add_argument("--jid", required=True, help="your bare JID")
    p.add_argument("--email", help="an e-mail address to put in the certificates")
    p.add_argument("--key-bits", type=int, default=2048, choices=(2048, 3072, 4096))
    p.set_defaults(func=cmd_init)
    p = command("import-cert", "store issued certificates and the CA root")
    p.add_argument("certs", nargs="+", help="PEM files: your sign/encrypt certificates, CA root")
    p.set_defaults(func=cmd_import)
    command("show", "print JID, fingerprints and expiry").set_defaults(func=cmd_show)
    p = command("change-pin", "re-encrypt the profile under a new PIN")
    p.add_argument("--new-pin-file", help=f"file with the new PIN (else ${NEW_PIN_ENV})")
    p.set_defaults(func=cmd_change_pin)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, (CapsuleError,))


if __name__ == "__main__":
    sys.exit(main())
