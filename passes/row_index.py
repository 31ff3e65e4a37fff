"""Id -> slot maps shared by the representations that split a table's rows (tt cache, hot-cold,
prune-dims): the narrowest integer dtype that holds them, and a sorted-id lookup built from gathers.

Two ways to find "is id i in a set S of K ids, and at which slot":

* a slot map: one entry per table row (``rows × itemsize`` bytes), one gather per lookup;
* a sorted id list padded to M = 2^m >= K with a sentinel (``M × 4`` bytes) searched by m
  branchless halving steps, each a gather and a compare (binary lifting: after the steps ``pos``
  is the number of listed ids < i, so i is listed iff ids[pos] == i).  No ``searchsorted``: that
  does not export; the loop runs over the m static steps, never over bags or rows.
"""

from __future__ import annotations

import numpy as np
import torch

INT16_MAX = 2**15 - 1
INT32_MAX = 2**31 - 1
SENTINEL = INT32_MAX          # > every id: tables have < 2^31 rows


def narrow_int_dtype(lo: int, hi: int) -> torch.dtype:
    """The narrowest of int16 / int32 holding every value in [lo, hi]."""
    if -INT16_MAX - 1 <= lo and hi <= INT16_MAX:
        return torch.int16
    if -INT32_MAX - 1 <= lo and hi <= INT32_MAX:
        return torch.int32
    raise ValueError(f"values in [{lo}, {hi}] do not fit int32")


def narrow_tensor(values: np.ndarray) -> torch.Tensor:
    """``values`` as the narrowest int tensor that holds them exactly."""
    values = np.asarray(values, dtype=np.int64)
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    return torch.from_numpy(values).to(narrow_int_dtype(lo, hi))


def padded_sorted_ids(ids: np.ndarray) -> torch.Tensor:
    """Sorted ``ids`` (distinct, < 2^31) padded with SENTINEL to a power-of-two length, int32."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    m = 1 << max(0, int(len(ids) - 1).bit_length())
    out = np.full(m, SENTINEL, dtype=np.int64)
    out[:len(ids)] = ids
    return torch.from_numpy(out).to(torch.int32)


def sorted_lookup(sorted_ids: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot [n] int64, found [n] bool) of ``ids`` in ``sorted_ids`` [M = 2^m] (see module doc).
    ``slot`` is the position in ``sorted_ids``; meaningful only where ``found``."""
    m = sorted_ids.shape[0]
    pos = torch.zeros_like(ids)
    step = m // 2
    while step >= 1:                       # m static steps (a trace-time constant)
        probe = sorted_ids.index_select(0, pos + (step - 1)).to(torch.int64)
        pos = torch.where(probe < ids, pos + step, pos)
        step //= 2
    found = sorted_ids.index_select(0, pos).to(torch.int64) == ids
    return pos, found


def sorted_lookup_steps(length: int) -> int:
    """Dependent gathers ``sorted_lookup`` does per id for a padded list of ``length``."""
    return max(0, length.bit_length() - 1) + 1


def hottest_rows(counts: np.ndarray, rows: int | None = None, coverage: float | None = None) -> np.ndarray:
    """Ids of the most accessed rows (count > 0, most accessed first, ties by id): the first
    ``rows`` of them, or the fewest whose counts cover ``coverage`` of all lookups."""
    counts = np.asarray(counts)
    order = np.lexsort((np.arange(len(counts)), -counts))
    touched = order[counts[order] > 0]
    if coverage is not None:
        cum = np.cumsum(counts[touched])
        k = int(np.searchsorted(cum, coverage * cum[-1] * (1 - 1e-12))) + 1 if len(cum) else 0
    else:
        k = int(rows or 0)
    return touched[:min(k, len(touched))]
