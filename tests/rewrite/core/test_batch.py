"""Batch validation: every malformed batch gets one line naming the problem; good ones pass through
(int32 ids and offsets accepted and widened to int64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewrite.core.batch import Batch, batch_from_dense_ids, bucket_rows, bucket_sizes, validate
from rewrite.core.errors import RewriteError

ROWS = [3, 10]          # two features
B = 2


def good() -> Batch:
    # feature 0: bags [0, 2], [];  feature 1: bags [9], [1, 1, 4]
    return Batch(torch.zeros(B, 4), torch.tensor([0, 2, 9, 1, 1, 4]), torch.tensor([0, 2, 2, 3, 6]),
                 torch.tensor([1.0, 0.0]))


def check(batch: Batch, *fragments) -> None:
    with pytest.raises(RewriteError) as e:
        validate(batch, 4, ROWS, where="req.npz")
    msg = str(e.value)
    assert msg.startswith("req.npz: ") and "\n" not in msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


def test_good_batch_passes_unchanged():
    b = good()
    out = validate(b, 4, ROWS)
    assert torch.equal(out.indices, b.indices) and torch.equal(out.offsets, b.offsets)
    assert out.dense.dtype == torch.float32 and out.size == B


def test_int32_accepted():
    b = good()
    out = validate(Batch(b.dense.double(), b.indices.int(), b.offsets.int()), 4, ROWS)
    assert out.indices.dtype == torch.int64 and out.offsets.dtype == torch.int64
    assert out.dense.dtype == torch.float32
    assert torch.equal(out.indices, b.indices)


def test_bad_shapes_and_dtypes():
    b = good()
    check(Batch(torch.zeros(B, 3), b.indices, b.offsets), "dense must be [B, 4], got [2, 3]")
    check(Batch(torch.zeros(4), b.indices, b.offsets), "dense must be [B, 4], got [4]")
    check(Batch(torch.zeros(B, 4, dtype=torch.int64), b.indices, b.offsets), "dense must be floating point")
    check(Batch(b.dense, b.indices.float(), b.offsets), "indices and offsets must be int32 or int64")
    check(Batch(b.dense, b.indices, b.offsets[:-1]), "offsets must have F*B+1 = 5 entries (F=2, B=2), got [4]")
    check(Batch(b.dense, b.indices.view(2, 3), b.offsets), "indices must be 1-D [N], got [2, 3]")
    check(Batch(b.dense, b.indices, b.offsets.view(5, 1)), "offsets must have F*B+1 = 5", "got [5, 1]")
    check(Batch(b.dense, b.indices, b.offsets, torch.zeros(3)), "labels must be [B]=2, got [3]")


def test_bad_offsets():
    b = good()
    check(Batch(b.dense, b.indices, torch.tensor([1, 2, 2, 3, 6])), "offsets must start at 0", "got 1 .. 6")
    check(Batch(b.dense, b.indices, torch.tensor([0, 2, 2, 3, 5])), "end at len(indices)=6", "got 0 .. 5")
    check(Batch(b.dense, b.indices, torch.tensor([0, 4, 2, 3, 6])), "offsets decrease at position 2")


def test_ids_out_of_range():
    b = good()
    check(Batch(b.dense, torch.tensor([0, 3, 9, 1, 1, 4]), b.offsets), "feature 0 has id 3 outside", "[0, 3)")
    check(Batch(b.dense, torch.tensor([0, 2, 9, 1, 10, 4]), b.offsets), "feature 1 has id 10", "[0, 10)")
    check(Batch(b.dense, torch.tensor([0, 2, -1, 1, 1, 4]), b.offsets), "feature 1 has id -1")


def test_batch_from_dense_ids_is_feature_major():
    cat = np.array([[1, 7], [2, 8], [0, 9]])          # 3 samples, 2 features
    b = batch_from_dense_ids(np.ones((3, 4)), cat, np.array([0, 1, 1]))
    assert b.indices.tolist() == [1, 2, 0, 7, 8, 9]
    assert b.offsets.tolist() == list(range(7))
    assert [f.tolist() for f in b.feature_ids(2)] == [[1, 2, 0], [7, 8, 9]]
    assert b.labels.dtype == torch.float32 and b.indices.dtype == torch.int64


def test_bucket_rows_rounds_up_to_four_significant_bits():
    assert [bucket_rows(m) for m in (1, 15, 16, 17, 33, 261, 1024, 1025)] == [1, 15, 16, 18, 36, 288, 1024, 1152]
    assert all(m <= bucket_rows(m) <= m * 9 / 8 for m in range(1, 5000))
    sizes = bucket_sizes(2048)
    assert len(sizes) == 72 and sizes[-1] == 2048 and bucket_sizes(1025)[-1] == 1152
    assert {bucket_rows(m) for m in range(1, 2049)} == set(sizes)      # at most 8 per octave
