"""Timing shared by the in-process micro-benchmarks (bench_crypto, bench_v1)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

ROUNDS = int(os.environ.get("CAPSULE_BENCH_ROUNDS", "200"))


def per_call(fn: Callable[[], object], rounds: int = ROUNDS, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean seconds per call."""
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(rounds):
            fn()
        samples.append((time.perf_counter() - began) / rounds)
    return statistics.median(samples)
