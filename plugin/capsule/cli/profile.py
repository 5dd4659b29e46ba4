"""``capsule profile …``: create the local profile, import certificates, show it, change its PIN."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from cryptography import x509

from capsule import algorithms as alg
from capsule import enrollment
from capsule.cli.base import (
    NEW_PIN_ENV,
    add_profile_options,
    add_share_unlock,
    add_short_pin,
    new_pin,
    open_profile,
)
from capsule.core import cert_fingerprint, utc_timestamp
from capsule.errors import ProfileError, UntrustedCertificate
from capsule.pins import PIN_ENV
from capsule.profile import Profile
from capsule.trust import TrustStore


def cmd_init(args: argparse.Namespace) -> None:
    pin = new_pin(args, args.pin_file, PIN_ENV)
    print(f"generating an {args.sign.upper()} signing key and an RSA encryption key…", flush=True)
    profile = Profile.create(args.profile, args.jid, pin, email=args.email, key_bits=args.key_bits,
                             short_pin=args.short_pin, key_file=args.key_file, signing=args.sign,
                             share_unlock_with=args.share_unlock_with)
    base = Path(args.profile)
    for usage in ("sign", "encrypt"):
        csr = base.with_name(f"{base.name}.{usage}.csr")
        csr.write_bytes(profile.csr(usage))
        print(f"{usage:8} CSR: {csr}")
    email = f" --email {args.email}" if args.email else ""  # the CA checks the CSR's SAN
    print(f"profile for {args.jid} written to {base}. Have the CA certify both CSRs, e.g.\n"
          f"  capsule-ca issue CADIR --csr {base.name}.sign.csr --jid {args.jid}{email} "
          f"--usage sign --out sign.pem\n"
          f"  capsule-ca issue CADIR --csr {base.name}.encrypt.csr --jid {args.jid}{email} "
          f"--usage encrypt --out enc.pem\n"
          f"then: capsule profile import-cert --profile {base} sign.pem enc.pem CADIR/root.pem "
          f"CADIR/crl.pem")


def cmd_import(args: argparse.Namespace) -> None:
    profile = open_profile(args)
    crls, ours = [], []
    for name in args.certs:
        try:
            pem = Path(name).read_bytes()
        except OSError as exc:
            raise ProfileError(f"cannot read {name}: {exc.strerror}") from None
        if b"-----BEGIN X509 CRL-----" in pem:
            crls.append((name, pem))  # checked against the root, which may come later
            continue
        usage = profile.import_cert(pem)
        if usage != "ca":
            ours.append((name, pem, usage))
        print(f"{name}: stored as {usage} certificate")
    for name, pem in crls:
        try:
            stored = enrollment.store_crl(profile, pem)
        except UntrustedCertificate as exc:
            raise ProfileError(f"{name}: {exc}") from None
        print(f"{name}: " + ("stored as the CA's CRL" if stored
                             else "not newer than the stored CRL; kept that one"))
    if profile.data.ca_root:  # nothing is saved unless ours chain to the root, unrevoked
        crl = profile.data.crl.encode() if profile.data.crl else None
        trust = TrustStore(profile.data.ca_root.encode(), crl)
        for name, pem, usage in ours:
            try:
                trust.verify(pem, profile.data.jid, usage)
            except UntrustedCertificate as exc:
                raise ProfileError(f"{name}: {exc}; nothing stored") from None
    profile.save()
    if profile.ready():
        print("profile is ready: keys, both certificates and the CA root are in place")


def cmd_show(args: argparse.Namespace) -> None:
    profile = open_profile(args)
    data = profile.data
    print(f"JID       {data.jid}" + (f" <{data.email}>" if data.email else ""))
    print(f"protected {profile.protection}")
    print(f"unlock    {profile.unlock} (profiles with this salt and PIN: one Argon2id run "
          f"per process)")
    for label, pem in (("sign", data.signing_cert), ("encrypt", data.encryption_cert),
                       ("CA root", data.ca_root)):
        if not pem:
            print(f"{label:9} (missing)")
            continue
        cert = x509.load_pem_x509_certificate(pem.encode())
        fp = cert_fingerprint(cert)
        print(f"{label:9} SHA-256 {fp}  expires {cert.not_valid_after_utc:%Y-%m-%d}")
    print(f"contacts  {len(data.contacts)} pinned"
          + (f": {', '.join(sorted(data.contacts))}" if data.contacts else ""))
    print(f"retired   {len(data.retired)} encryption key(s) kept for old messages")
    print(f"sessions  {len(data.sessions)} session key(s) held, {len(data.destroyed)} "
          f"destroyed")
    for key in sorted(data.sessions, key=lambda k: k.expires):
        destroy = dt.datetime.fromtimestamp(key.expires + alg.SESSION_RETENTION_S, dt.UTC)
        print(f"  session {key.record.sid.hex()}  created {key.record.created}  expires "
              f"{key.record.expires}  destroyed after {utc_timestamp(destroy)}")


def cmd_change_pin(args: argparse.Namespace) -> None:
    profile = open_profile(args)
    profile.change_pin(new_pin(args, args.new_pin_file, NEW_PIN_ENV), short_pin=args.short_pin,
                       share_unlock_with=args.share_unlock_with)
    print(f"PIN of {args.profile} changed")


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    prof = top.add_parser("profile", help="create and manage the local profile")
    sub = prof.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        add_profile_options(p, "the profile's key file (init: create and bind one)")
        return p

    p = command("init", "generate keys locally and write CSRs for the CA")
    p.add_argument("--jid", required=True, help="your bare JID")
    p.add_argument("--email", help="an e-mail address to put in the certificates")
    p.add_argument("--key-bits", type=int, default=2048, choices=(2048, 3072, 4096))
    p.add_argument("--sign", default=alg.SIGNING_KEY_TYPES[0], choices=alg.SIGNING_KEY_TYPES,
                   help="signing key type (ed25519: v1's fast signatures; rsa: of --key-bits, "
                   "for peers older than wire format v1)")
    add_short_pin(p)
    add_share_unlock(p)
    p.set_defaults(func=cmd_init)
    p = command("import-cert", "store issued certificates and the CA root")
    p.add_argument("certs", nargs="+",
                   help="PEM files: your sign/encrypt certificates, the CA root, the CA's CRL")
    p.set_defaults(func=cmd_import)
    command("show", "print JID, protection, certificates and session keys").set_defaults(
        func=cmd_show)
    p = command("change-pin", "re-encrypt the profile under a new PIN")
    p.add_argument("--new-pin-file", help=f"file with the new PIN (else ${NEW_PIN_ENV})")
    add_short_pin(p)
    add_share_unlock(p)
    p.set_defaults(func=cmd_change_pin)
