"""Capsule's tier-one certificate authority, driven through the ``openssl`` CLI."""

from capsule_ca.authority import Authority, CertRecord
from capsule_ca.errors import CAError

__all__ = ["Authority", "CAError", "CertRecord"]
