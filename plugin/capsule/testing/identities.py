"""Offline enrollment for tests and the demo: a profile whose keys are certified by a local CA."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from capsule.enrollment import store_crl
from capsule.profile import FAST_KDF, KdfParams, Profile
from capsule_ca import Authority
from capsule_ca.profiles import Usage


def enroll(authority: Authority, path: str | Path, jid: str, pin: str,
           kdf: KdfParams | None = FAST_KDF, not_after: dt.datetime | None = None,
           not_before: dt.datetime | None = None,
           share_unlock_with: str | Path | None = None) -> Profile:
    """Create a profile for ``jid``, have ``authority`` certify both keys, import everything
    (the root and a CRL renewed if half its life is over, as `capsule-ca serve` would).

    ``kdf`` defaults to light Argon2id parameters: test bots open many profiles. Real users get
    the strong defaults from ``capsule profile init``. ``share_unlock_with``: take that
    profile's Argon2id salt and parameters instead (``kdf`` is then ignored).
    """
    profile = Profile.create(path, jid, pin, kdf=None if share_unlock_with else kdf,
                             short_pin=True,  # test PINs are short
                             share_unlock_with=share_unlock_with)
    for usage in (Usage.SIGN, Usage.ENCRYPT):
        record = authority.issue(profile.csr(usage.value), jid, usage, replace=True,
                                 not_before=not_before, not_after=not_after)
        profile.import_cert(record.pem())
    profile.import_cert(authority.root_pem)
    if authority.crl_needs_renewal():
        authority.gencrl()
    store_crl(profile, authority.crl_path.read_bytes())
    profile.save()
    return profile
