"""Merging canonical batches (feature-major, offsets rebased) and splitting the answers."""

from __future__ import annotations

import numpy as np
import pytest

from rewrite.runtime import check_batch, load
from rewrite.serving.batching import merge, split
from tests.serving.conftest import N_DENSE, ROWS, ragged
from tests.tolerances import assert_close

F = len(ROWS)


def bag(batch, f: int, j: int) -> np.ndarray:
    dense, idx, off = batch
    b = dense.shape[0]
    return idx[off[f * b + j]:off[f * b + j + 1]]


@pytest.mark.parametrize("sizes", [[1], [3, 1, 5], [1, 1, 1, 1], [7, 64, 2]])
def test_merged_bags_are_the_requests_bags(sizes):
    batches = [ragged(b, seed=10 + k, mean_len=1.5 + k) for k, b in enumerate(sizes)]
    merged, got_sizes = merge(batches, F)
    assert got_sizes == sizes
    check_batch(*merged, N_DENSE, ROWS)                  # a valid canonical batch
    j = 0
    for batch, b in zip(batches, sizes):
        assert np.array_equal(merged[0][j:j + b], batch[0])
        for f in range(F):
            for s in range(b):
                assert np.array_equal(bag(merged, f, j + s), bag(batch, f, s))
        j += b


def test_all_empty_bags_and_empty_requests_merge():
    a = (np.zeros((2, N_DENSE), np.float32), np.zeros(0, np.int64), np.zeros(2 * F + 1, np.int64))
    b = ragged(3, seed=1)
    merged, _ = merge([a, b, a], F)
    assert merged[2][-1] == len(merged[1]) == len(b[1])
    check_batch(*merged, N_DENSE, ROWS)


def test_predict_on_merged_equals_each_request(bundle_dir):
    pred = load(bundle_dir)
    batches = [ragged(b, seed=20 + b) for b in (1, 4, 9, 2)]
    merged, sizes = merge(batches, F)
    for path in pred.paths:
        parts = split(pred.predict(*merged, path=path), sizes)
        for batch, part in zip(batches, parts):
            assert_close(part, pred.predict(*batch, path=path), "probability-rebatched", f"{path} B={len(part)}")
