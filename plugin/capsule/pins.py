"""PINs: where one comes from (a file, else the environment, else a prompt) and whether it is
strong enough.

One reader for the plugin (never prompts) and every command line (``capsule``,
``capsule-ca``, the stack), so a PIN file means the same to all of them: its first line
without the line break.
"""

from __future__ import annotations

import getpass
import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from capsule.errors import ProfileError, WeakPin

PIN_ENV = "CAPSULE_PIN"


def read_secret(file: str | None, env: str, what: str, confirm: bool = False,
                check: Callable[[str], object] | None = None,
                error: type[Exception] = ProfileError, prompt: bool = True) -> str:
    """A secret from a file, else ``$env``, else a prompt (twice when ``confirm``; never
    without ``prompt`` or a terminal); ``error`` is raised when there is none."""
    if file:
        try:
            return Path(file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise error(f"cannot read {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise error(f"{file} is not UTF-8 text") from None
    if env and os.environ.get(env):
        try:
            os.environ[env].encode()
        except UnicodeEncodeError:  # undecodable bytes in the environment
            raise error(f"${env} is not UTF-8 text") from None
        return os.environ[env]
    if not prompt or not sys.stdin.isatty():
        raise error(f"no {what}: use its file option, ${env} or a terminal" if prompt
                    else f"no {what}: give its file or set ${env}")
    first = getpass.getpass(f"{what}: ")
    if check:
        check(first)
    if confirm and getpass.getpass(f"{what} again: ") != first:
        raise error(f"the two entries of the {what} differ")
    return first


def plugin_pin(pin: str | None, pin_file: str | None) -> str:
    """The plugin's PIN: the ``pin`` option, else ``pin_file``, else $CAPSULE_PIN."""
    if pin is None:
        pin = read_secret(pin_file, PIN_ENV, "PIN", prompt=False)
    if not pin:
        raise ProfileError(f"no PIN: pass 'pin', 'pin_file' or set ${PIN_ENV}")
    return pin


def check_pin(pin: str, short_ok: bool = False) -> str:
    """'strong' (10+ digits, or a passphrase of 12+ characters) or, only with ``short_ok``,
    'short' (6+ digits, or 8+ characters); anything else is refused, and so is a trivial
    secret whatever its length (the first guesses of any thief)."""
    if trivial(pin):
        raise WeakPin("the PIN is trivially guessable (blank, one repeated character, a "
                           "short repeated group or a run like 1234 or abcd): choose another")
    digits = pin.isdigit()
    if len(pin) >= (10 if digits else 12):
        return "strong"
    if short_ok and len(pin) >= (6 if digits else 8):
        return "short"
    if short_ok:
        raise ProfileError("the PIN must be 6 or more digits, or a passphrase of 8 or more "
                           "characters")
    raise ProfileError("the PIN must be 10 or more digits, or a passphrase of 12 or more "
                       "characters (6+ digits or 8+ characters only with --short-pin)")


def trivial(pin: str) -> bool:
    """Blank, a repeated group of 1-3 characters (0000, 121212, abcabc), or a run stepping by
    one either way (123456, 9876, 1234567890, abcdef)."""
    if not pin.strip():
        return True
    if any(len(pin) > n and pin == pin[:n] * (len(pin) // n) for n in (1, 2, 3)):
        return True
    steps = {(ord(b) - ord(a)) % 10 if pin.isdigit() else ord(b) - ord(a)
             for a, b in itertools.pairwise(pin)}
    return steps in ({1}, {-1}, {9})


def brute_force_cost(pin: str, seconds_per_guess: float) -> str:
    """What trying every PIN like ``pin`` costs a thief of the file (no key file)."""
    if pin.isdigit():
        hours = 10 ** len(pin) * seconds_per_guess / 3600
        return (f"a thief of the profile file can try all 10^{len(pin)} PINs of {len(pin)} "
                f"digits in about {hours:,.0f} core-hours ({seconds_per_guess:.2f} s per guess "
                f"here): {hours / 64:,.1f} hours on one rented 64-core machine")
    return (f"each guess costs a thief {seconds_per_guess:.2f} s of one core; a passphrase "
            f"of {len(pin)} characters from a word list or keyboard pattern falls in hours")
