"""Fresh inference batches and per-call timing, shared by compile-time measurement and the bench.

Serving batches: ``pooling`` ids per bag (Criteo: one), ids uniform over each table (so rows are
not cache-resident, unlike one repeated batch, which looks 1.3-1.7x faster: NOTES-stack.md),
dense features log1p of count-like values as the demo data.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def serving_batches(rows: list[int], n_dense: int, batch: int, count: int, seed: int,
                    pooling: int = 1) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``count`` distinct canonical batches (dense f32 [B, n_dense], indices i64, offsets i64)."""
    rng = np.random.default_rng([seed, batch])
    out = []
    for _ in range(count):
        dense = np.log1p(rng.exponential(8.0, (batch, n_dense))).astype(np.float32)
        indices = np.concatenate([rng.integers(0, r, batch * pooling) for r in rows]).astype(np.int64)
        offsets = np.arange(0, len(rows) * batch * pooling + 1, pooling, dtype=np.int64)
        out.append((dense, indices, offsets))
    return out


def time_calls(call: Callable[[object], object], inputs: list, repeat: int = 1) -> list[float]:
    """Seconds per call of ``call(x)`` for each x in ``inputs`` (``repeat`` passes over them)."""
    times = []
    for _ in range(repeat):
        for x in inputs:
            t0 = time.perf_counter()
            call(x)
            times.append(time.perf_counter() - t0)
    return times


def median_ms(call: Callable[[object], object], inputs: list, warmup: int, calls: int) -> float:
    """Median milliseconds of ``call(inputs[k % len(inputs)])`` over ``calls`` calls after
    ``warmup`` untimed ones (inputs cycled, so each call gets the next fresh batch)."""
    for k in range(warmup):
        call(inputs[k % len(inputs)])
    times = []
    for k in range(calls):
        x = inputs[k % len(inputs)]
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def interleaved_median_ms(calls: dict, rounds: int, warmup_rounds: int = 2, per_turn: int = 1) -> dict:
    """{key: median ms of ``calls[key]()``} over ``rounds`` rounds that give every call a turn
    (after ``warmup_rounds`` untimed ones): a burst of load on a shared host slows one round of
    every candidate, not all samples of one.  ``per_turn`` > 1 calls a candidate that often per
    turn and times all but the first, so a small call is timed warm (as in a stream of such
    requests), not just after another candidate evicted its weights."""
    samples: dict = {key: [] for key in calls}
    for round_ in range(warmup_rounds + rounds):
        for key, fn in calls.items():
            times = time_calls(lambda _, fn=fn: fn(), [None] * per_turn)
            if round_ >= warmup_rounds:
                samples[key] += times[1:] if per_turn > 1 else times
    return {key: float(np.median(v)) * 1e3 for key, v in samples.items()}

