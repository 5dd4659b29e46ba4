"""``capsule enroll`` and ``capsule rotate``: keys and certificates from the CA service over XMPP."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from slixmpp import ClientXMPP

from capsule import enrollment
from capsule.cli.base import (
    add_profile_options,
    add_server_options,
    add_share_unlock,
    add_short_pin,
    new_pin,
    open_profile,
    read_pin,
)
from capsule.connection import enable_registration, login
from capsule.enrollment import EnrollmentError
from capsule.errors import ProfileError
from capsule.pins import PIN_ENV
from capsule.profile import Profile


def _connect_and(args: argparse.Namespace, profile: Profile, rotate: bool) -> None:
    """Log in as the profile's JID, (re)enroll with the CA service, publish the certificates."""
    password = read_pin(args.password_file, "CAPSULE_XMPP_PASSWORD", "XMPP account password",
                    confirm=False)
    try:
        ca_root = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    except OSError as exc:
        raise EnrollmentError(f"cannot read {args.ca_cert}: {exc.strerror}") from None
    tls_ca = args.tls_ca or args.ca_cert
    if not tls_ca and profile.data.ca_root:
        tls_file = Path(args.profile).with_name(Path(args.profile).name + ".ca.pem")
        tls_file.write_text(profile.data.ca_root)
        tls_ca = str(tls_file)
    if not tls_ca:
        raise EnrollmentError("give --ca-cert (or --tls-ca) so the server's TLS certificate "
                              "can be verified")

    def confirm(fp: str) -> bool:
        print(f"The CA presents root certificate SHA-256 {fp}")
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise EnrollmentError("the CA root must be confirmed: compare the fingerprint and "
                                  "rerun with --yes, or give --ca-cert")
        return input("Trust this CA root? [y/N] ").strip().lower() in ("y", "yes")

    async def go() -> None:
        client = ClientXMPP(profile.data.jid, password)
        client.register_plugin("xep_0060")
        if getattr(args, "register", False):
            enable_registration(client)
        await login(client, args.host, args.port, tls_ca)
        print(f"logged in as {client.boundjid.bare}; asking the CA service {args.ca}…",
              flush=True)
        try:
            await enrollment.enroll_profile(client, profile, args.ca, ca_root, confirm, rotate)
        finally:
            await client.disconnect()

    with profile.exclusive():  # a running bot's profile fails here, before the CA revokes
        asyncio.run(go())


def cmd_enroll(args: argparse.Namespace) -> None:
    path = Path(args.profile)
    if path.exists() and args.share_unlock_with is not None:
        raise ProfileError(f"{path} exists: --share-unlock-with is for a new profile (for this "
                           f"one: capsule profile change-pin --share-unlock-with)")
    if path.exists():
        profile = open_profile(args)
    else:
        if not args.jid:
            raise ProfileError(f"{path} does not exist: give --jid to create it")
        pin = new_pin(args, args.pin_file, PIN_ENV)
        profile = Profile.create(path, args.jid, pin, email=args.email, short_pin=args.short_pin,
                                 key_file=args.key_file,
                                 share_unlock_with=args.share_unlock_with)
        print(f"created {path} for {args.jid}")
    _connect_and(args, profile, rotate=False)
    print(f"{profile.data.jid} is enrolled with {args.ca}; certificates stored and published")


def cmd_rotate(args: argparse.Namespace) -> None:
    profile = open_profile(args)
    _connect_and(args, profile, rotate=True)
    print(f"new keys and certificates for {profile.data.jid}; the old ones are revoked, the old "
          f"encryption key kept for old messages")


def add_parsers(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, text, func in (
        ("enroll", "from nothing to ready: profile, keys, certificates from the CA service",
         cmd_enroll),
        ("rotate", "new keys and certificates; old ones revoked, old encryption key kept",
         cmd_rotate),
    ):
        p = top.add_parser(name, help=text, description=text)
        add_profile_options(p, "the profile's key file (enroll: bind a new profile)")
        p.add_argument("--ca", required=True, help="the CA service's JID, e.g. ca@example.org")
        p.add_argument("--ca-cert", help="the CA root to trust (else pinned on first use)")
        add_server_options(p, "--ca-cert, or the profile's CA root")
        p.add_argument("--password-file", help="XMPP password (else $CAPSULE_XMPP_PASSWORD)")
        p.add_argument("--yes", action="store_true", help="accept the CA root shown")
        if name == "enroll":
            p.add_argument("--jid", help="your bare JID (to create the profile)")
            p.add_argument("--email", help="an e-mail address for the certificates")
            add_short_pin(p)
            add_share_unlock(p)
            p.add_argument("--register", action="store_true",
                           help="create the XMPP account in-band (XEP-0077) if the server allows")
        p.set_defaults(func=func)
