"""Every algorithm and size Capsule v0 and v1 use, named once (pyca style: explicit objects)."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

VERSION_TAG = b"urn:capsule:0"

MESSAGE_KEY_BYTES = 32  # AES-256
IV_BYTES = 12  # GCM nonce
TAG_BYTES = 16
NID_BYTES = 16
DEFAULT_RSA_BITS = 2048  # NIST SP 800-57: 112-bit security through 2030
ACCEPTED_RSA_BITS = (2048, 3072, 4096)
RSA_PUBLIC_EXPONENT = 65537
RPAD_MAX = 200  # random padding 0..RPAD_MAX bytes hides the exact length

# the profile: Argon2id parameters accepted from a file header (checked before any derivation)
ARGON2_MEMORY_KIB = (8192, 1 << 20)  # 8 MiB .. 1 GiB
ARGON2_ITERATIONS = (1, 16)
ARGON2_LANES = (1, 16)
KDF_SALT_BYTES = 16  # Argon2id salt (RFC 9106: 16 bytes)
PROFILE_KEY_BYTES = 32  # AES-256-GCM key of the profile file
JOURNAL_EPOCH_BYTES = 16  # names the profile save a journal belongs to
KEY_FILE_BYTES = 32  # the optional second secret kept outside the profile
PROFILE_KEY_FILE_INFO = b"capsule profile key: pin + key file"
PROFILE_KEY_INFO = b"capsule profile key: this profile's"  # format 3, over its key salt
JOURNAL_KEY_INFO = b"capsule replay journal"
RECEIPT_KEY_INFO = b"capsule receipt proof"  # HKDF label: the message key -> receipt MAC key
KEY_HASH = hashes.SHA256()  # HKDF for the keys above, HMAC of the receipt proof

# certificate fingerprints: SHA-256 over the DER encoding, lower-case hex (core.fingerprint)


def oaep() -> padding.OAEP:
    """RSA-OAEP with SHA-256 and MGF1-SHA-256: wraps the message key."""
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def pss() -> padding.PSS:
    """RSA-PSS with SHA-256, MGF1-SHA-256, 32-byte salt: signs the capsule."""
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


SIGNATURE_HASH = hashes.SHA256()
CSR_HASH = hashes.SHA256()  # signs our certificate requests


# -- wire format v1: session keys (README, "Protocol (wire format v1)") -------------------------
V1_VERSION_TAG = b"urn:capsule:1"
SESSION_TAG = b"urn:capsule:session:1"  # first field of a session record's signed bytes
WRAP_INFO = b"urn:capsule:1 wrap"  # HKDF info prefix of a key-encryption key
WRAP_HASH = hashes.SHA256()  # HKDF-SHA256 from the X25519 shared secret to the AES-KW key
KEK_BYTES = 32  # AES-256 key wrap (RFC 3394)
WRAPPED_BYTES = MESSAGE_KEY_BYTES + 8  # AES-KW output
X25519_BYTES = 32
SID_BYTES = 16  # a session key's id: SHA-256(pub)[:16]
SESSION_LIFETIME_S = 48 * 3600  # a record's expires - created
SESSION_MAX_LIFETIME_S = 7 * 86400  # longer records are refused
SESSION_ROTATE_S = 86400  # a new session key when the newest is older than this
SESSION_MIN_ROTATE_S = 600  # ... and at a login, unless the newest is younger than this
DESTROYED_REMEMBERED = 2048  # ids of destroyed session keys kept (to say session-expired)
SESSION_RETENTION_S = 14 * 86400  # private key destroyed this long after its record expires
SESSION_MAX_RETENTION_S = 365 * 86400
SESSIONS_PUBLISHED = 8  # at most this many unexpired records on the node
SIGNING_KEY_TYPES = ("ed25519", "rsa")  # a profile's signing key; new profiles: the first
