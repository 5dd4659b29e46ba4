"""Seal and open per message against the raw RSA-2048 private-key operation, same run.

Goal (issue 3): pipeline / raw <= 1.15 on each side. Sealing costs one RSA-PSS signature
(private) plus one RSA-OAEP wrap (public) per recipient and for the sender; opening costs one
signature check (public) plus one unwrap (private). Printed, never asserted.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from capsule import algorithms as alg
from capsule import core, envelope
from tests.bench.timing import per_call
from tests.helpers import body


@pytest.mark.parametrize("recipients", [1, 5])
def bench_seal_and_open(recipients: int) -> None:
    sign_key = rsa.generate_private_key(65537, 2048)
    keys = [rsa.generate_private_key(65537, 2048) for _ in range(recipients + 1)]
    people = [core.Recipient(f"r{i}@x.test", f"fp{i}", k.public_key()) for i, k in enumerate(keys)]
    text = os.urandom(512).hex()  # 1 KiB body
    digest = os.urandom(32)
    raw_sign = per_call(lambda: sign_key.sign(digest, alg.pss(), alg.SIGNATURE_HASH))
    wrapped = keys[0].public_key().encrypt(os.urandom(32), alg.oaep())
    raw_unwrap = per_call(lambda: keys[0].decrypt(wrapped, alg.oaep()))

    def seal() -> core.Capsule:
        env = envelope.encode(body(text), "s@x.test", [p.jid for p in people[:-1]],
                              core.utc_timestamp())
        return core.seal(env, sender="s@x.test", sender_cert="sfp", signing_key=sign_key,
                         recipients=people)

    capsule = seal()

    def open_() -> envelope.Envelope:
        core.verify(capsule, sign_key.public_key())
        return envelope.decode(core.unseal(capsule, jid="r0@x.test", certs={"fp0": keys[0]}))

    t_seal, t_open = per_call(seal), per_call(open_)
    print(f"\n{recipients} recipient(s), 1 KiB: seal {t_seal * 1e3:.3f} ms vs raw RSA-2048 sign "
          f"{raw_sign * 1e3:.3f} ms -> ratio {t_seal / raw_sign:.2f}; open {t_open * 1e3:.3f} ms "
          f"vs raw RSA-2048 OAEP decrypt {raw_unwrap * 1e3:.3f} ms -> ratio "
          f"{t_open / raw_unwrap:.2f} (goal <= 1.15)")
