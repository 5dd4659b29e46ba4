"""Capsule's exceptions: one class per reason, each with a message a user can act on.

``reason`` is a short stable token carried by ``capsule_error`` events and logs.
"""

from __future__ import annotations


class CapsuleError(Exception):
    """Base of every Capsule error."""

    reason = "error"


class MalformedCapsule(CapsuleError):
    """The capsule is not well-formed: missing fields, bad base64, wrong sizes."""

    reason = "malformed"


class UnsupportedVersion(CapsuleError):
    """The capsule or profile uses a format version this Capsule does not know."""

    reason = "unsupported-version"


class BadSignature(CapsuleError):
    """The signature does not verify with the sender's signing certificate: tampered or forged."""

    reason = "bad-signature"


class NotAddressedToUs(CapsuleError):
    """The capsule holds no key for our encryption certificate."""

    reason = "not-for-us"


class UntrustedCertificate(CapsuleError):
    """A certificate does not chain to our CA, is expired, has the wrong usage or JID."""

    reason = "untrusted"


class RevokedCertificate(UntrustedCertificate):
    """A certificate is on the CA's revocation list."""

    reason = "revoked"


class RevocationUnknown(CapsuleError):
    """No CRL from our CA is at hand, so whether a certificate is revoked cannot be told."""

    reason = "revocation-unknown"


class StaleCrl(RevocationUnknown):
    """The newest CRL we hold is past its nextUpdate: a withheld update would go unnoticed."""

    reason = "stale-crl"


class EnvelopeMismatch(CapsuleError):
    """The signed envelope's from/to disagree with the header or the stanza (forwarded?)."""

    reason = "envelope-mismatch"


class ReplayedCapsule(CapsuleError):
    """A capsule with this sender and nonce was already accepted."""

    reason = "replay"


class DuplicateCapsule(CapsuleError):
    """The very capsule (sender, nid and signature) was already accepted: a resend or a copy.

    Never reaches the app as ``capsule_error``: dropped quietly and counted. ``handed``: its
    first copy is known to have reached the app (not still on its way there).
    """

    reason = "duplicate"

    def __init__(self, message: str, handed: bool = False):
        super().__init__(message)
        self.handed = handed
        self.proof = b""  # for the receipt of a live one-to-one copy (capsule.receipts)


class FutureCapsule(CapsuleError):
    """The capsule is dated later than our clock plus the allowed skew."""

    reason = "clock-skew"


class StaleCapsule(CapsuleError):
    """The capsule is older than the maximum age for live delivery (read it from history)."""

    reason = "too-old"


class DecryptionFailed(CapsuleError):
    """The key could not be unwrapped or the payload did not authenticate."""

    reason = "decrypt-failed"


class NoCertificate(CapsuleError):
    """No valid certificate is known for a recipient, so nothing can be encrypted to it."""

    reason = "no-certificate"


class PolicyViolation(CapsuleError):
    """The configured policy forbids this (plaintext where encryption is required, no TLS)."""

    reason = "policy"


class ProfileError(CapsuleError):
    """The local profile cannot be used."""

    reason = "profile"


class StorageError(CapsuleError):
    """State cannot be made durable (full or read-only disk): nothing is delivered meanwhile."""

    reason = "storage"


class WrongPin(ProfileError):
    """The PIN does not open the profile."""

    reason = "wrong-pin"


class WeakPin(ProfileError):
    """A new PIN is trivially guessable (blank, repeated, a run like 1234)."""

    reason = "weak-pin"


class ProfileInUse(ProfileError):
    """Another process (a running bot) holds the profile: a second writer would roll its
    replay state and session keys back."""

    reason = "profile-in-use"


class ProfileChanged(ProfileError):
    """Another process wrote the profile since this one read it: writing our copy would roll
    its state back (capsules accepted twice, session keys lost). Open it again."""

    reason = "profile-changed"


class CorruptProfile(ProfileError):
    """The profile file is truncated or damaged."""

    reason = "corrupt-profile"


class CertificateLookupFailed(CapsuleError):
    """Looking up certificates gave no definite answer (time-out, server error): never plaintext."""

    reason = "lookup-failed"


class CertificateWithdrawn(UntrustedCertificate):
    """A contact we pinned now publishes no valid certificates: refused, never plaintext."""

    reason = "withdrawn"


class UninterpretableContent(MalformedCapsule):
    """The envelope holds nothing this receiver can read (e.g. a body outside jabber:client)."""

    reason = "uninterpretable"


class Undelivered(CapsuleError):
    """A sent capsule was not acknowledged by the server within the bound, or was returned."""

    reason = "undelivered"


class ReusedId(CapsuleError):
    """A capsule's stanza id is still outstanding, or was reported, for that contact: one
    receipt or bounce would then stand for two capsules. Nothing was sent."""

    reason = "reused-id"


class SessionExpired(NotAddressedToUs):
    """The capsule was sealed to a session key of ours that has been destroyed (forward
    secrecy): it can never be opened again."""

    reason = "session-expired"


class InvalidSessionRecord(CapsuleError):
    """A published session record does not verify, is expired, too long-lived or malformed."""

    reason = "bad-session"


class NoForwardSecrecy(PolicyViolation):
    """``forward_secrecy='require'`` and a peer has no valid session key, or a v0 capsule came in."""

    reason = "no-forward-secrecy"


class SealingFailed(CapsuleError):
    """Sealing a message failed in a way no other reason names (a bug): nothing was sent."""

    reason = "seal-failed"
