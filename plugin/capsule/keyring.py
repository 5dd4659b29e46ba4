"""The session keys at hand (wire format v1): ours, rotated, published and destroyed on time,
and our contacts', looked up on PEP, verified against their signing certificate and cached.

Whether a capsule can be v1 is decided here: every recipient and we ourselves need a valid
session record (README, "Version choice").
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass

from slixmpp import BaseXMPP

from capsule import algorithms as alg
from capsule import discovery, sessions, stanza_v1
from capsule import namespaces as ns
from capsule.errors import CapsuleError
from capsule.profile import Profile
from capsule.sessions import SessionRecord
from capsule.trust import VerifiedCert

log = logging.getLogger(__name__)
PEERS_REMEMBERED = 1024  # contacts whose chosen session record is cached
NONE_REUSE = 60  # seconds "no valid session record" is believed before asking again


@dataclass(frozen=True)
class _Peer:
    when: float  # time.monotonic() of the look-up
    cert: str  # the signing certificate the records were checked against
    records: tuple[SessionRecord, ...]  # valid ones, newest first (one per device)


class Keyring:
    """Our session keys in ``store`` and the cached records of our contacts."""

    def __init__(self, xmpp: BaseXMPP, store: Profile, *, rotate: int, retention: int,
                 skew: int, timeout: int, refresh: int):
        if not 0 < rotate <= alg.SESSION_LIFETIME_S // 2:
            raise ValueError(f"session_rotate must be 1..{alg.SESSION_LIFETIME_S // 2} s")
        if not 0 <= retention <= alg.SESSION_MAX_RETENTION_S:
            raise ValueError(f"session_retention must be 0..{alg.SESSION_MAX_RETENTION_S} s")
        self.xmpp, self.store = xmpp, store
        self.rotate_after, self.retention, self.skew = rotate, retention, skew
        self.timeout, self.refresh = timeout, refresh
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    # -- ours -------------------------------------------------------------------
    def destroy(self, now: int) -> bool:
        """Destroy keys past retention, in memory: whether any was (then the caller saves)."""
        destroyed = self.store.destroy_sessions(now, self.retention)
        if destroyed:
            log.info("destroyed %d session key(s) past retention", destroyed)
        return destroyed > 0

    def rotate(self, now: int, force: bool = False) -> bool:
        """:meth:`destroy`, and make a new session key if none is current (none, or signed
        under a signing certificate we no longer hold), if the newest is older than
        ``rotate``, or at a login (``force``) unless it is younger than
        alg.SESSION_MIN_ROTATE_S (a reconnecting loop must not pile up keys). Whether
        anything changed: the caller saves."""
        changed = self.destroy(now)
        current = self.store.current_sessions(now)
        newest = sessions.created(current[0]) if current else None
        age = None if newest is None else now - newest
        if age is None or age >= self.rotate_after or (force and age >= alg.SESSION_MIN_ROTATE_S):
            self.store.new_session(now)
            return True
        return changed

    async def publish(self, now: int, signer: VerifiedCert) -> bool:
        """Our newest record to PEP, beside the valid records of our other devices found on
        the node (read, merged, written: raises IqError/IqTimeout, CapsuleError). Not written
        when the node holds exactly the merged records and has the options a publish sets;
        whether it was."""
        mine = self.store.current_sessions(now)[:1]
        ours = set(self.store.session_keys()) | self.store.destroyed_sessions()
        payloads, configured = await discovery.published_item(
            self.xmpp, ns.SESSIONS_NODE, self.timeout, "own session keys")
        others, _ = sessions.select(_records(payloads, self.store.data.jid), self.store.data.jid,
                                    signer.fingerprint, signer.public_key, now, self.skew)
        merged = (mine + [r for r in others if r.sid not in ours])[:alg.SESSIONS_PUBLISHED]
        self._peers.pop(self.store.data.jid, None)  # our own devices: read again when sealing
        if configured and _holds(payloads, merged):
            return False
        await discovery.publish_item(self.xmpp, ns.SESSIONS_NODE,
                                     stanza_v1.build_sessions(merged), self.timeout)
        return True

    def own(self, now: int) -> SessionRecord | None:
        """Our newest unexpired record (we seal our own copy to it)."""
        current = self.store.current_sessions(now)
        return current[0] if current else None

    # -- our contacts' (and our other devices') ---------------------------------------
    async def peer(self, jid: str, signer: VerifiedCert, now: int) -> list[SessionRecord]:
        """``jid``'s valid session records (one per device), checked against its verified
        signing certificate ``signer``; empty if it has none or the look-up failed (logged)."""
        cached = self._peers.get(jid)
        reuse = (self.refresh if cached is None or cached.records
                 else min(self.refresh, NONE_REUSE))
        if (cached is not None and time.monotonic() - cached.when < reuse
                and cached.cert == signer.fingerprint
                and all(sessions.expires(r) > now for r in cached.records)):
            return list(cached.records)
        try:
            payloads = await discovery.fetch_item(self.xmpp, jid, ns.SESSIONS_NODE,
                                                  self.timeout, "session keys")
        except CapsuleError as exc:
            log.info("no session keys of %s at hand: %s", jid, exc)
            return []  # not cached: asked again next time
        return self.learn(jid, signer, _records(payloads, jid), now)

    def known(self, jid: str) -> list[SessionRecord]:
        """``jid``'s records as last looked up (no I/O; empty if never)."""
        cached = self._peers.get(jid)
        return list(cached.records) if cached else []

    def learn(self, jid: str, signer: VerifiedCert, records: list[SessionRecord], now: int
              ) -> list[SessionRecord]:
        """Check ``jid``'s published records against its verified signing certificate and
        remember the valid ones (or that there are none) for ``refresh`` seconds."""
        valid, refused = sessions.select(records, jid, signer.fingerprint, signer.public_key,
                                         now, self.skew)
        for reason in refused:
            log.info("ignoring a session record: %s", reason)
        self._peers[jid] = _Peer(time.monotonic(), signer.fingerprint, tuple(valid))
        self._peers.move_to_end(jid)
        while len(self._peers) > PEERS_REMEMBERED:
            self._peers.popitem(last=False)
        return valid


def _holds(payloads: list[ET.Element] | None, records: list[SessionRecord]) -> bool:
    """Whether a PEP item is exactly one ``<sessions/>`` of ``records``, in order."""
    if payloads is None or len(payloads) != 1 or payloads[0].tag != stanza_v1.SNS + "sessions":
        return False
    found, dropped = stanza_v1.parse_sessions(payloads[0])
    return not dropped and found == records


def _records(payloads: list[ET.Element] | None, jid: str) -> list[SessionRecord]:
    """The session records in the payloads of a PEP item (malformed ones dropped, logged)."""
    records: list[SessionRecord] = []
    for payload in payloads or []:
        if payload.tag == stanza_v1.SNS + "sessions":
            found, dropped = stanza_v1.parse_sessions(payload)
            records += found
            if dropped:
                log.info("%s publishes %d malformed session record(s)", jid, dropped)
    return records
