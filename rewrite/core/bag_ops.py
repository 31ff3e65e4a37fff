"""Embedding-bag ops that the ONNX and TVM lowerings see as one graph node each.

    dlrm_rewrite::segment_sum(values [n, D], offsets [B+1]) -> [B, D] fp32
        out[b] = sum_{p in offsets[b]..offsets[b+1]-1} values[p]
    dlrm_rewrite::gather_segment_sum(weight [rows, D], indices [n], offsets [B+1]) -> [B, D] fp32
        out[b] = sum_{p in offsets[b]..offsets[b+1]-1} weight[indices[p]]

Sums are taken in fp32 whatever the storage dtype (fp32 / fp16 / bf16); empty bags are zero;
offsets start at 0 and end at n.  They exist only while a lowering exports the model
(``with lowering():``): the representations emit them instead of the scatter-add form
(``rewrite.core.embedding.segment_sum``), and each lowering translates them into its fastest form:
``targets.onnx.bags`` (stock ONNX ops) and ``targets.tvm.bags`` (one TIR kernel per table).
Exports outside ``lowering()`` (torch-compile's AOTInductor package, which must load without
this module) keep the plain-ATen form.  The eager implementations (``F.embedding_bag`` over the
gathered rows) are the reference the lowerings are tested against; the fake implementations give
torch.export the output shape [offsets.numel() - 1, D].
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor
from torch.nn import functional as F

_state = threading.local()


@contextlib.contextmanager
def lowering():
    """While active, exported representations emit these ops (ONNX / TVM lowerings only)."""
    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def active() -> bool:
    return getattr(_state, "active", False)


def _sum_rows(rows: Tensor, offsets: Tensor) -> Tensor:
    ids = torch.arange(rows.shape[0], device=rows.device)
    return F.embedding_bag(ids, rows.to(torch.float32), offsets, mode="sum", include_last_offset=True)


@torch.library.custom_op("dlrm_rewrite::segment_sum", mutates_args=())
def segment_sum(values: Tensor, offsets: Tensor) -> Tensor:
    return _sum_rows(values, offsets)


@segment_sum.register_fake
def _(values, offsets):
    return values.new_empty((offsets.shape[0] - 1, values.shape[1]), dtype=torch.float32)


@torch.library.custom_op("dlrm_rewrite::gather_segment_sum", mutates_args=())
def gather_segment_sum(weight: Tensor, indices: Tensor, offsets: Tensor) -> Tensor:
    return _sum_rows(weight.index_select(0, indices), offsets)


@gather_segment_sum.register_fake
def _(weight, indices, offsets):
    return weight.new_empty((offsets.shape[0] - 1, weight.shape[1]), dtype=torch.float32)


SEGMENT_SUM = torch.ops.dlrm_rewrite.segment_sum.default
GATHER_SEGMENT_SUM = torch.ops.dlrm_rewrite.gather_segment_sum.default
