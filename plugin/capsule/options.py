"""The plugin's options, read once from its slixmpp config into a typed, frozen object.

Every name and default is the ``default_config`` of the plugin (README, "Options"); the PIN
options are not kept here: the PIN is read once (:func:`capsule.pins.plugin_pin`) and dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from capsule import algorithms as alg
from capsule import envelope
from capsule.errors import ProfileError
from capsule.replay import DEFAULT_MAX_AGE, DEFAULT_SKEW
from capsule.trust import CertificateSource

Policy = Literal["require", "prefer", "off"]
POLICIES: tuple[Policy, ...] = ("require", "prefer", "off")
ForwardSecrecy = Literal["prefer", "require"]
FORWARD_SECRECY: tuple[ForwardSecrecy, ...] = ("prefer", "require")


@dataclass(frozen=True)
class CapsuleOptions:
    profile: Path  # the profile file
    key_file: str | None = None  # the profile's key file, if it is bound to one
    policy: Policy = "prefer"
    allow_insecure: bool = False  # operate on a stream without TLS
    publish: bool = True  # publish our certificates to PEP on session start
    carbons: bool = False  # enable XEP-0280 and decrypt carbon copies for this resource
    rooms: bool = True  # load XEP-0045 for group chat; False: a bot without rooms, fewer handlers
    crl: str | None = None  # path of the CA's CRL file, re-read when it changes
    crl_refresh: float = 300  # seconds between CRL refreshes (file and CA service)
    crl_retry: float = 30  # seconds before a failed fetch of an expired CRL is tried again
    ca_service: str | None = None  # JID of `capsule-ca serve` (default: the enrolling one)
    save_delay: float = 0.2  # seconds to batch profile saves (pins, CRL); replay: journal
    skew: int = DEFAULT_SKEW  # seconds a capsule may be dated ahead of our clock
    max_age: int = DEFAULT_MAX_AGE  # seconds a capsule may wait (offline) for live delivery
    storage_retry: float = 2.0  # seconds between attempts to make state durable again
    fetch_timeout: int = 10
    fetch_interval: float = 60  # seconds: at most one look-up per claimed sender
    max_envelope_bytes: int = envelope.MAX_BYTES
    max_envelope_depth: int = envelope.MAX_DEPTH
    source: CertificateSource | None = None  # where contacts' certificates come from: PEP
    delivery_timeout: float = 120  # seconds for the server to ack a capsule, else undelivered
    receipt_timeout: float = 600  # seconds after that ack for the contact's receipt, else so
    outbox_limit: int = 2000  # unconfirmed capsules kept for resending
    reconnect: bool = True  # reconnect a lost session, back-off doubling up to reconnect_max
    reconnect_max: float = 30
    # (host, port) of every node of a clustered server: a lost session reconnects to any
    endpoints: tuple[tuple[str, int], ...] = ()
    forward_secrecy: ForwardSecrecy = "prefer"  # README, "Version choice"
    session_rotate: int = alg.SESSION_ROTATE_S  # a new session key after this many seconds
    session_retention: int = alg.SESSION_RETENTION_S  # destroyed this long after its expiry
    session_refresh: int = 3600  # seconds a contact's session records are reused unfetched

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CapsuleOptions:
        """Check and convert the plugin config (ValueError for a bad policy, bad
        ``endpoints``, a switch that is not a bool, or ``forward_secrecy='require'`` without
        ``policy='require'``; ProfileError without a profile)."""
        if config.get("policy") not in POLICIES:
            raise ValueError(f"capsule policy must be one of {POLICIES}, not "
                             f"{config.get('policy')!r}")
        if config.get("forward_secrecy", "prefer") not in FORWARD_SECRECY:
            raise ValueError(f"forward_secrecy must be one of {FORWARD_SECRECY}, not "
                             f"{config.get('forward_secrecy')!r}")
        if config.get("forward_secrecy") == "require" and config.get("policy") != "require":
            # a plaintext message has less than v0's protection: requiring forward secrecy
            # while letting plaintext through is a contradiction, refused up front
            raise ValueError("forward_secrecy='require' needs policy='require' (plaintext "
                             "has no forward secrecy either)")
        if not config.get("profile"):
            raise ProfileError("the capsule plugin needs a 'profile' path")
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in config.items() if k in names and v is not None}
        given["profile"] = Path(config["profile"])
        given["policy"] = cast(Policy, config["policy"])
        given["endpoints"] = _endpoints(given.get("endpoints", ()))
        for name in BOOLEANS:  # "false" from a config file must not mean True
            if name in given and not isinstance(given[name], bool):
                raise ValueError(f"capsule option {name} must be True or False, not "
                                 f"{given[name]!r}")
        for name in ("skew", "max_age", "fetch_timeout", "outbox_limit", "max_envelope_bytes",
                     "max_envelope_depth", "session_rotate", "session_retention",
                     "session_refresh"):
            if name in given:
                given[name] = int(given[name])
        return cls(**given)


# the switches, as the fields declare them (a value that is not a bool is refused)
BOOLEANS = tuple(f.name for f in dataclasses.fields(CapsuleOptions) if f.type == "bool")


def _endpoints(value: Any) -> tuple[tuple[str, int], ...]:
    """``endpoints`` as README shows it, a list of ``(host, port)`` pairs, else ValueError."""
    shape = ("capsule endpoints must be a list of (host, port) pairs, e.g. "
             "[('127.0.0.1', 5222), ('127.0.0.1', 5223)] (from $CAPSULE_ENDPOINTS: "
             "capsule.connection.endpoints_from_env())")
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{shape}, not {value!r}")
    pairs = []
    for item in value:
        if isinstance(item, str | bytes) or not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"{shape}, not {value!r}")
        host, port = item
        if not isinstance(host, str) or not host or isinstance(port, bool) or not (
                isinstance(port, int) and 0 < port < 65536):
            raise ValueError(f"{shape}: {item!r} is not a host name and a port number")
        pairs.append((host, port))
    return tuple(pairs)


def default_config() -> dict[str, Any]:
    """The plugin's ``default_config``: every option's default, and the PIN options."""
    defaults = {f.name: f.default for f in dataclasses.fields(CapsuleOptions)}
    return {**defaults, "profile": None, "pin": None, "pin_file": None, "unlocked": None}
