"""Recovery on N ranks: DDP over the trained tensors, and each rank's share of every batch.

Before: ``recover``'s training step, ``functional_call(student, values(), inputs)`` on a batch.
After:  on N ranks, the same call inside ``DistributedDataParallel`` (gloo), whose parameters are
        the trained fp32 masters, so backward all-reduces (averages) their gradients; each rank
        trains on rows r, r+N, ... of every global batch (the 1-process batches, same shuffle), so the
        averaged gradient is the 1-process batch gradient (up to summation order) and the steps,
        the learning-rate schedule and early stopping are one process's.  One process: unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from rewrite.core.model import RecModel
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


def shard_rows(rows: np.ndarray, ranks: Group) -> np.ndarray | None:
    """This rank's rows of a global batch: every N-th from the rank's own (all of them on one
    process); None, on every rank alike, for a batch smaller than N (a rank would have none)."""
    if not ranks.distributed:
        return rows
    return rows[ranks.rank::ranks.world] if len(rows) >= ranks.world else None
