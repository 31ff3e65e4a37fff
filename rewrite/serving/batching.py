"""Merging canonical batches into one and splitting the answer back.

A canonical batch of B samples and F features is (dense [B, n_dense], indices [N],
offsets [F*B+1]) with the indices **feature-major**: all of feature 0's lookups for samples
0..B-1, then feature 1's, ...; bag (f, b) is ``indices[offsets[f*B + b] : offsets[f*B + b + 1]]``.

``merge(batches, F)`` stacks k batches (B_1 + ... + B_k samples, in order) so that the merged
bag (f, j) is bag (f, b) of the request owning sample j: within each feature the requests'
segments are concatenated in request order, and the offsets are rebuilt from the bag lengths
(so each request's offsets are rebased onto the merged indices).  ``split(out, sizes)`` cuts
the merged result [sum B_r] back into per-request pieces.  Both are pure numpy, O(N + F*B).
"""

from __future__ import annotations

import numpy as np

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


def merge(batches: list[Batch], n_features: int) -> tuple[Batch, list[int]]:
    """k canonical batches -> (one canonical batch, [B_1, ..., B_k])."""
    sizes = [int(d.shape[0]) for d, _, _ in batches]
    if len(batches) == 1:
        return batches[0], sizes
    dense = np.concatenate([d for d, _, _ in batches])
    # bag lengths [F, B_r] per request, side by side -> [F, sum B_r], feature-major
    lengths = np.concatenate([np.diff(o).reshape(n_features, b) for (_, _, o), b in zip(batches, sizes)],
                             axis=1)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths.reshape(-1), out=offsets[1:])
    # each request's indices carry feature labels; a stable sort by feature keeps request order
    indices = np.concatenate([i for _, i, _ in batches])
    feature = np.concatenate([np.repeat(np.arange(n_features, dtype=np.int16), np.diff(o[::b]) if b else
                                        np.zeros(n_features, dtype=np.int64))
                              for (_, _, o), b in zip(batches, sizes)])
    order = np.argsort(feature, kind="stable")
    return (dense, indices[order], offsets), sizes


def split(out: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """The merged result's rows, one piece per request (views)."""
    if len(sizes) == 1:
        return [out]
    ends = np.cumsum(sizes)
    return [out[e - s:e] for s, e in zip(sizes, ends)]
