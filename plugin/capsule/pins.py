"""Where a PIN or another secret comes from: a file, else the environment, else a prompt.

One reader for the plugin (never prompts) and every command line (``capsule``,
``capsule-ca``, the stack), so a PIN file means the same to all of them: its first line
without the line break.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path

from capsule.errors import ProfileError

PIN_ENV = "CAPSULE_PIN"


def read_secret(file: str | None, env: str, what: str, confirm: bool = False,
                check: Callable[[str], object] | None = None,
                error: type[Exception] = ProfileError, prompt: bool = True) -> str:
    """A secret from a file, else ``$env``, else a prompt (twice when ``confirm``; never
    without ``prompt`` or a terminal); ``error`` is raised when there is none."""
    if file:
        try:
            return Path(file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise error(f"cannot read {file}: {exc.strerror}") from None
    if env and os.environ.get(env):
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
