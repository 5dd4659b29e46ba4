"""``capsule``: manage the local profile (keys, certificates, PIN), enroll with the CA service,
audit what a server stored.

PINs come from a prompt (asked twice when new), else ``--pin-file``, else ``$CAPSULE_PIN``;
they are never echoed, logged or written anywhere but into the Argon2id derivation.
"""

from __future__ import annotations

import argparse
import logging

from capsule.audit.panel import PanelError
from capsule.audit.report import ReportError
from capsule.audit.sources import SourceError
from capsule.cli import audit, enroll, profile
from capsule.cli.base import run
from capsule.connection import LoginError
from capsule.errors import CapsuleError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    top = parser.add_subparsers(dest="group", required=True)
    profile.add_parser(top)
    enroll.add_parsers(top)
    audit.add_parsers(top)
    return parser


def main(argv: list[str] | None = None) -> int:
    # slixmpp's own log lines would reach stderr through logging's last resort handler; its
    # failures reach the user as our one line instead
    slixmpp_log = logging.getLogger("slixmpp")
    if not slixmpp_log.handlers:
        slixmpp_log.addHandler(logging.NullHandler())
    return run(build_parser(), argv, (CapsuleError, SourceError, PanelError, LoginError,
                                      ReportError))

