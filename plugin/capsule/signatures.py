"""Capsule signatures, v0 and v1: the algorithm follows the signing key (RSA-PSS or Ed25519).

Pure: bytes in, a verdict out. Any other key type is refused loudly (TypeError) before use.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from capsule import algorithms as alg

SigningKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
VerifyingKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def sign(key: SigningKey, data: bytes) -> bytes:
    """RSA-PSS(SHA-256) for an RSA key, Ed25519 over ``data`` itself for an Ed25519 key."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, alg.pss(), alg.SIGNATURE_HASH)
    raise TypeError(f"a signing key must be RSA or Ed25519, not {type(key).__name__}")


def valid(key: VerifyingKey, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` over ``data`` verifies with ``key`` (its own algorithm)."""
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, alg.pss(), alg.SIGNATURE_HASH)
        else:
            raise TypeError(f"a verifying key must be RSA or Ed25519, not {type(key).__name__}")
    except InvalidSignature:
        return False
    return True


def kind(key: SigningKey | VerifyingKey) -> str:
    """'ed25519' or 'rsa' (alg.SIGNING_KEY_TYPES)."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "rsa"
    raise TypeError(f"not a Capsule signing key: {type(key).__name__}")
