"""Recovery on N ranks: DDP over the trained tensors, and each rank's share of every batch.

Before: ``recover``'s training step, ``functional_call(student, values(), inputs)`` on a batch.
After:  on N ranks, the same call inside ``DistributedDataParallel`` (gloo), whose parameters are
        the trained fp32 masters, so backward all-reduces (averages) their gradients; each rank
        trains on rows r, r+N, ... of every global batch (the 1-process batches, same shuffle), so the
        averaged gradient is the 1-process batch gradient (up to summation order) and the steps,
        the learning-rate schedule and early stopping are one process's.  One process: unchanged.

The gradients travel by all-gather, not all-reduce, while a bucket's gathered copy is small
(``GATHER_MAX_BYTES``): each rank receives every rank's bucket and sums them in rank order, so
every rank holds the same bits.  On gloo over 127.0.0.1 (this 2-core host, 2 ranks) an
all-reduce of the recovery benchmark's 30 KB of gradients took 1.3-1.8 ms and an all-gather
0.3-0.5 ms: the all-reduce runs a ring of more message rounds, and at this size each round costs
latency, not bandwidth.  Larger buckets keep the all-reduce (N-fold memory, and bandwidth wins).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from rewrite.core.model import RecModel
from rewrite.distributed import Group

GATHER_MAX_BYTES = 4 << 20     # a bucket gathered from every rank up to this size, else all-reduced


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

    ddp = DistributedDataParallel(_Trained(student, values, masters))
    ddp.register_comm_hook(ranks.world, _average_small_by_gather)
    return ddp


def _average_small_by_gather(world: int, bucket):     # DDP refuses a string return annotation
    """DDP comm hook: the bucket's mean over the ranks, Σ_r g_r / N summed in rank order from an
    all-gather while N·bytes <= GATHER_MAX_BYTES, else an all-reduce (DDP's default)."""
    import torch.distributed as dist

    grad = bucket.buffer()
    if world * grad.numel() * grad.element_size() > GATHER_MAX_BYTES:
        grad.div_(world)
        return dist.all_reduce(grad, async_op=True).get_future().then(lambda fut: fut.value()[0])
    parts = torch.empty(world * grad.numel(), dtype=grad.dtype)
    gathered = dist.all_gather_single(parts, grad, async_op=True).get_future()

    def mean(_) -> torch.Tensor:
        each = parts.view(world, -1)
        total = each[0].clone()
        for part in each[1:]:
            total += part
        return total.div_(world)

    return gathered.then(mean)


def shard_rows(rows: np.ndarray, ranks: Group) -> np.ndarray | None:
    """This rank's rows of a global batch: every N-th from the rank's own (all of them on one
    process); None, on every rank alike, for a batch smaller than N (a rank would have none)."""
    if not ranks.distributed:
        return rows
    return rows[ranks.rank::ranks.world] if len(rows) >= ranks.world else None
