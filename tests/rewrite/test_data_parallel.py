"""data_parallel: the ranks' shares of a recovery epoch make up one process's batches."""

from __future__ import annotations

import torch

from rewrite import data
from rewrite.data_parallel import train_batches
from rewrite.distributed import SINGLE, Group
from tests.pass_helpers import model_and_day


def test_the_ranks_shares_are_the_one_process_batches_interleaved(tmp_path):
    ds = data.open(model_and_day(tmp_path, (3, 40, 257), n=1101) / "day.npz", "log1p")
    one = list(train_batches(ds, 100, 1001, seed=7, ranks=SINGLE))
    shares = [list(train_batches(ds, 100, 1001, seed=7, ranks=Group(r, 2))) for r in (0, 1)]
    assert len(one) == 11 and one[-1].size == 1          # 1001 rows: ten of 100, then one
    assert len(shares[0]) == len(shares[1]) == 10        # the 1-row batch would leave rank 1 without rows
    for whole, r0, r1 in zip(one, *shares):
        assert (r0.size, r1.size) == (50, 50)
        assert torch.equal(whole.dense[0::2], r0.dense) and torch.equal(whole.dense[1::2], r1.dense)
        assert torch.equal(whole.labels[0::2], r0.labels) and torch.equal(whole.labels[1::2], r1.labels)
