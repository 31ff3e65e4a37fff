"""rewrite.core.bag_ops: the ops' eager semantics against a Python loop, and when exports emit them."""

from __future__ import annotations

import pytest
import torch

from rewrite.core import bag_ops
from rewrite.core.embedding import TableBag
from tests.tolerances import assert_close

LENGTHS = [2, 0, 3, 1, 0, 0, 4]                  # ragged, empty bags inside and at the end


def offsets_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


def loop_sum(rows, offsets):
    return torch.stack([rows[offsets[b]:offsets[b + 1]].double().sum(0)
                        for b in range(len(offsets) - 1)]).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_segment_sum_is_the_fp32_sum_of_the_stored_rows(dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(30, 8, generator=g).to(dtype)
    off = offsets_of(LENGTHS)
    ids = torch.randint(0, 30, (int(off[-1]),), generator=g)
    ids[0] = 29                                  # the largest id
    out = bag_ops.gather_segment_sum(weight, ids, off)
    assert out.dtype == torch.float32 and out.shape == (len(LENGTHS), 8)
    assert_close(out, loop_sum(weight.index_select(0, ids).float(), off), "float32")
    assert not out[[1, 4, 5]].any()              # empty bags are exactly zero
    assert_close(bag_ops.segment_sum(weight.index_select(0, ids), off), out, "exact")


def test_all_empty_and_fake_shapes():
    off = torch.zeros(4, dtype=torch.int64)
    assert not bag_ops.segment_sum(torch.zeros(0, 5), off).any()
    with torch._subclasses.FakeTensorMode():
        out = bag_ops.gather_segment_sum(torch.empty(10, 6, dtype=torch.float16),
                                         torch.empty(7, dtype=torch.int64), torch.empty(4, dtype=torch.int64))
    assert out.shape == (3, 6) and out.dtype == torch.float32


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_exports_emit_the_ops_only_inside_lowering(pooling):
    table = TableBag(50, 8, pooling=pooling, weight=torch.randn(50, 8))
    idx = torch.tensor([3, 49, 0, 7, 7, 12, 49], dtype=torch.int64)
    off = torch.tensor([0, 2, 2, 5, 5, 7], dtype=torch.int64)
    n, b = torch.export.Dim("n", min=2), torch.export.Dim("b", min=4)

    def ops(ep):
        return {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}

    with bag_ops.lowering():
        lowered = torch.export.export(table, (idx, off), dynamic_shapes=({0: n}, {0: b}))
    assert "dlrm_rewrite.gather_segment_sum.default" in ops(lowered)
    assert not any("scatter" in o or "embedding_bag" in o for o in ops(lowered))
    assert_close(lowered.module()(idx, off), table(idx, off), "float32")
    assert not bag_ops.active()
    plain = torch.export.export(table, (idx, off), dynamic_shapes=({0: n}, {0: b}))
    assert not any("dlrm_rewrite" in o for o in ops(plain))   # torch-compile's packages stay ATen
