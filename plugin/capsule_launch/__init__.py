"""The console commands' entry points, kept apart from the packages they start.

Importing ``capsule`` takes a while (slixmpp, cryptography); a Ctrl-C in that time, or a reader
that closed our output (``capsule profile show … | head -1``), must end the command quietly
instead of with a traceback, and an entry point inside those packages would be too late for the
first. Nothing is imported here that Python has not loaded already.
"""

import importlib
import os
import sys

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
BROKEN_PIPE = 141  # 128 + SIGPIPE


def _launch(module: str) -> None:
    code: str | int | None
    try:
        try:
            code = importlib.import_module(module).main()
        except SystemExit as exc:  # argparse's --help and usage errors: flush those too
            code = exc.code
        sys.stdout.flush()
    except KeyboardInterrupt:
        code = INTERRUPTED
    except BrokenPipeError:
        # the interpreter flushes stdout again at exit: point it at nothing first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = BROKEN_PIPE
    sys.exit(code)


def capsule() -> None:
    _launch("capsule.cli")


def capsule_ca() -> None:
    _launch("capsule_ca.cli")
