"""data_parallel: the ranks' shares of a global batch make up one process's batch."""

from __future__ import annotations

import numpy as np

from rewrite.data_parallel import shard_rows
from rewrite.distributed import SINGLE, Group


def test_the_ranks_shares_are_the_batch_interleaved():
    rows = np.array([3, 8, 9, 20, 41])
    assert shard_rows(rows, SINGLE) is rows
    assert shard_rows(rows, Group(0, 2)).tolist() == [3, 9, 41]
    assert shard_rows(rows, Group(1, 2)).tolist() == [8, 20]
    assert sorted(np.concatenate([shard_rows(rows, Group(r, 3)) for r in range(3)]).tolist()) == rows.tolist()


def test_a_batch_smaller_than_the_ranks_is_skipped_on_every_rank():
    rows = np.array([5])
    assert [shard_rows(rows, Group(r, 2)) for r in (0, 1)] == [None, None]
    assert shard_rows(rows, SINGLE).tolist() == [5]
