"""data_parallel: the ranks' shares of a global batch make up one process's batch, and DDP's
gradient exchange averages them on 2 gloo ranks."""

from __future__ import annotations

import numpy as np
import torch

from rewrite.data_parallel import GATHER_MAX_BYTES, data_parallel, shard_rows
from rewrite.distributed import SINGLE, Group, launch


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


class _Scaled(torch.nn.Module):
    """loss = Σ w·x: the gradient of w is x, so each rank's gradient is what it feeds in."""

    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return (self.w * x).sum()


def _averaged_gradients(group: Group, sizes: list[int]) -> list[bool]:
    """On every rank: feed rank-dependent x through ``data_parallel`` and check each size's
    gradient is the ranks' mean, with the same bits on every rank."""
    results = []
    for n in sizes:
        student = _Scaled(n)
        master = torch.nn.Parameter(torch.zeros(n))
        forward = data_parallel(student, lambda: {"w": master}, [master], group)
        x = torch.linspace(-1, 1, n, dtype=torch.float32) * (group.rank + 1) / 3
        forward(x).backward()
        expected = sum(torch.linspace(-1, 1, n) * (r + 1) / 3 for r in range(group.world)) / group.world
        same_bits = len(set(group.exchange(master.grad.numpy().tobytes()))) == 1
        results.append(bool(torch.allclose(master.grad, expected, rtol=1e-6, atol=1e-7)) and same_bits)
    return results


def test_ddp_averages_gradients_by_gather_when_small_and_all_reduce_when_large():
    small, large = 1000, GATHER_MAX_BYTES // 4      # 2 ranks × 4 bytes × large > GATHER_MAX_BYTES
    assert launch(2, _averaged_gradients, ([small, large],), threads=1) == [True, True]
