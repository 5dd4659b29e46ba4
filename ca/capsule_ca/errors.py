"""Errors of the CA: each carries one line a user can act on."""


class CAError(Exception):
    """A CA operation was refused or failed; the CA directory is unchanged."""


class IdentityMismatch(CAError):
    """A CSR asks for an identity (JID, e-mail) other than the requester's."""


class UnsupportedKey(CAError):
    """A CSR's key is not one the CA certifies for the asked usage (RSA >= 2048 bits; Ed25519
    for signing only)."""
