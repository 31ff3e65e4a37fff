"""Recovery on N ranks: DDP over the trained tensors, and each rank's share of every batch.

Before: ``recover``'s training step, ``functional_call(student, values(), inputs)`` on a batch.
After:  on N ranks, the same call inside ``DistributedDataParallel`` (gloo), whose parameters are
        the trained fp32 masters, so backward all-reduces (averages) their gradients; each rank
        feeds rows r, r+N, ... of every global batch (the 1-process batches, same shuffle), so the
        averaged gradient is the 1-process batch gradient (up to summation order) and the steps,
        the learning-rate schedule and early stopping are one process's.  One process: unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from rewrite.core.errors import RewriteError
from rewrite.core.model import RecModel
from rewrite.data import Dataset
from rewrite.distributed import Group


class _Trained(torch.nn.Module):
    """The trained tensors as parameters, so that DDP all-reduces their gradients; the forward
    pass is the student's with them in place (``values``)."""

    def __init__(self, student: RecModel, values, masters: list[torch.Tensor]):
        super().__init__()
        self.tensors = torch.nn.ParameterList(masters)
        self._run = lambda *inputs: functional_call(student, values(), inputs)   # not a submodule

    def forward(self, *inputs):
        return self._run(*inputs)


def data_parallel(student: RecModel, values, masters: list[torch.Tensor], ranks: Group):
    """The training forward pass: the student itself on one process, wrapped in DDP on N ranks."""
    if not ranks.distributed:
        return lambda *inputs: functional_call(student, values(), inputs)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_Trained(student, values, masters))


def train_batches(data: Dataset, batch_size: int, n_train: int, seed: int, ranks: Group):
    """One epoch's batches over rows [0, n_train), shuffled by ``seed``; on N ranks every N-th row
    of each batch (the same global batches, so the same steps; a last batch smaller than N, which
    would leave a rank without rows, is dropped on every rank)."""
    if not ranks.distributed:
        yield from data.batches(batch_size, limit=n_train, shuffle_seed=seed)
        return
    if not hasattr(data, "batch"):
        raise RewriteError(f"{data.path}: a streamed TSV is read in order; convert it to .npz or TorchRec "
                           f".npy to recover on several ranks")
    order = np.random.default_rng(seed).permutation(n_train)
    for lo in range(0, n_train, batch_size):
        rows = np.sort(order[lo:lo + batch_size])
        if len(rows) >= ranks.world:
            yield data.batch(rows[ranks.rank::ranks.world])
