"""What every command group shares: the server options; the profile and PIN options (PINs read
by :mod:`capsule.pins`); running a command with its errors as one line.

``capsule-ca`` uses these too (it sits above ``capsule``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from capsule.connection import HOST_ENV, PORT_ENV, TLS_CA_ENV
from capsule.errors import ProfileError
from capsule.pins import PIN_ENV, brute_force_cost, check_pin, read_secret
from capsule.profile import KdfParams, Profile


def add_server_options(parser: argparse.ArgumentParser, tls_default: str) -> None:
    """--host, --port and --tls-ca, defaulting to what `scripts/stack status --exports` sets."""
    parser.add_argument("--host", default=os.environ.get(HOST_ENV, "127.0.0.1"),
                        help=f"XMPP server host (default ${HOST_ENV}, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get(PORT_ENV, "5222")),
                        help=f"c2s port, STARTTLS (default ${PORT_ENV}, else 5222)")
    parser.add_argument("--tls-ca", default=os.environ.get(TLS_CA_ENV),
                        help=f"CA file for the server's TLS certificate (default ${TLS_CA_ENV}, "
                        f"else {tls_default})")


def add_profile_options(p: argparse.ArgumentParser, key_file_help: str) -> None:
    p.add_argument("--profile", required=True, help="the profile file")
    p.add_argument("--pin-file", help=f"file holding the PIN (else ${PIN_ENV}, else a prompt)")
    p.add_argument("--key-file", help=key_file_help)


def add_share_unlock(p: argparse.ArgumentParser) -> None:
    p.add_argument("--share-unlock-with", metavar="OTHER",
                   help="take OTHER profile's Argon2id salt and parameters (the PIN, and key "
                   "file if OTHER has one, must open it): a process that opens both with the "
                   "PIN stretches it once, so a fleet of bots starts without one slow unlock "
                   "per bot")


def add_short_pin(p: argparse.ArgumentParser) -> None:
    p.add_argument("--short-pin", action="store_true",
                   help="allow a PIN of 6-9 digits or a passphrase of 8-11 characters "
                   "(prints what trying them all costs a thief)")


def run(parser: argparse.ArgumentParser, argv: list[str] | None,
        errors: tuple[type[Exception], ...]) -> int:
    """Run the parsed command (its int result is the exit code); an expected error becomes
    one line on stderr and exit 1."""
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except errors as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0


NEW_PIN_ENV = "CAPSULE_NEW_PIN"


def read_pin(file: str | None, env: str, prompt: str, confirm: bool, short_ok: bool = False) -> str:
    """A PIN (or password) from a file, the environment or a prompt; a new one is checked."""
    def check(pin: str) -> str:
        return check_pin(pin, short_ok)

    return read_secret(file, env, prompt, confirm, check if confirm else None, error=ProfileError)


def open_profile(args: argparse.Namespace) -> Profile:
    """Load the profile; session keys past (the default) retention are destroyed and the
    file saved first: forward secrecy does not wait for the bot to run."""
    profile = Profile.load(args.profile, read_pin(args.pin_file, PIN_ENV, "PIN", confirm=False),
                           args.key_file)
    if profile.destroy_sessions(int(time.time())):
        profile.save()
    return profile


def new_pin(args: argparse.Namespace, file: str | None, env: str) -> str:
    """A new PIN, checked; a short one (only with --short-pin) prints what it costs a thief."""
    pin = read_pin(file, env, "New PIN (10+ digits) or passphrase (12+ characters)", confirm=True,
                   short_ok=args.short_pin)
    if check_pin(pin, args.short_pin) == "short":
        began = time.perf_counter()
        KdfParams().guess(pin)
        print(f"warning: a short PIN. {brute_force_cost(pin, time.perf_counter() - began)}. "
              f"Bind the profile to a key file (--key-file) or choose 10+ digits.",
              file=sys.stderr)
    return pin
