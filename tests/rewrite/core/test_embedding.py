"""segment_sum / pool against torch's own nn.functional.embedding_bag, and the plain table's
contract (sizes, cost-model inputs, params round trip)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rewrite.core.embedding import (REPRESENTATIONS, TableBag, bag_ids, pool, register_representation,
                               representation_class, segment_sum)
from rewrite.core.errors import RewriteError
from tests.tolerances import assert_close

W = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))

# bag lengths -> offsets; each case is a layout embedding_bag must agree with
LAYOUTS = {
    "ragged": [3, 1, 4, 1, 5],
    "empty in the middle": [2, 0, 0, 3, 1],
    "leading empty": [0, 0, 2, 1],
    "trailing empty": [2, 3, 0, 0],
    "all empty": [0, 0, 0],
    "one bag": [7],
    "single empty bag": [0],
    "one id each": [1] * 9,
}


def _offsets(lengths) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)])


def _ids(n: int, seed: int) -> torch.Tensor:
    ids = torch.randint(0, W.shape[0], (n,), generator=torch.Generator().manual_seed(seed))
    if n > 2:
        ids[1] = ids[0]                                 # a duplicate id within a bag
        ids[-1] = W.shape[0] - 1                        # the largest id
    return ids


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_pool_matches_embedding_bag(layout, mode):
    offsets = _offsets(LAYOUTS[layout])
    ids = _ids(int(offsets[-1]), seed=len(layout))
    expected = F.embedding_bag(ids, W, offsets, mode=mode, include_last_offset=True)
    got = pool(W.index_select(0, ids), offsets, mode)
    assert got.shape == (len(LAYOUTS[layout]), W.shape[1])
    assert_close(got, expected, "float32", f"{mode} {layout}")
    if mode == "sum":
        assert_close(segment_sum(W.index_select(0, ids), offsets), expected, "float32", layout)


def test_empty_bags_pool_to_exact_zeros():
    offsets = _offsets([0, 2, 0, 0])
    out = pool(W.index_select(0, _ids(2, 1)), offsets, "mean")
    assert torch.equal(out[[0, 2, 3]], torch.zeros(3, W.shape[1]))


def test_bag_ids_by_hand():
    # bags of lengths 2, 0, 3, 0 (trailing empty): lookups belong to bags 0 0 2 2 2
    assert bag_ids(_offsets([2, 0, 3, 0]), torch.zeros(5)).tolist() == [0, 0, 2, 2, 2]
    assert bag_ids(_offsets([0, 0]), torch.zeros(0)).tolist() == []


def test_long_bags_and_many_bags():
    lengths = torch.randint(0, 40, (500,), generator=torch.Generator().manual_seed(3)).tolist()
    offsets = _offsets(lengths)
    ids = _ids(int(offsets[-1]), 4)
    assert_close(pool(W.index_select(0, ids), offsets, "sum"),
                 F.embedding_bag(ids, W, offsets, mode="sum", include_last_offset=True), "float32", "long")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_table_bag(dtype, pooling):
    t = TableBag(50, 6, pooling=pooling, dtype=dtype, weight=W)
    size = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    assert t.weight.dtype == getattr(torch, dtype)
    assert t.num_bytes() == 50 * 6 * size
    assert t.bytes_per_lookup() == 6 * size
    assert t.flops_per_lookup() == 6.0
    assert t.params() == {"rows": 50, "dim": 6, "pooling": pooling, "dtype": dtype}
    assert t.spec() == {"kind": "table", **t.params()}
    assert t.describe() == f"table 50x6 {dtype}"
    offsets = _offsets([3, 0, 2, 4])
    ids = _ids(9, 5)
    stored = t.weight.detach().to(torch.float32)           # the rounded values, read in fp32
    expected = F.embedding_bag(ids, stored, offsets, mode=pooling, include_last_offset=True)
    out = t(ids, offsets)
    assert out.dtype == torch.float32
    assert_close(out, expected, dtype, f"TableBag {dtype} {pooling}")
    assert torch.equal(t.dense_rows(torch.tensor([49, 0, 7])), stored[[49, 0, 7]])


def test_params_round_trip():
    t = TableBag(50, 6, pooling="mean", dtype="float16", weight=W)
    empty = representation_class("table").from_params(**t.params())
    empty.load_state_dict(t.state_dict())
    assert empty.params() == t.params() and torch.equal(empty.weight, t.weight)


def test_registry():
    assert representation_class("table") is TableBag
    assert {"table", "qr", "md"} <= set(REPRESENTATIONS)
    with pytest.raises(RewriteError, match=r"unknown representation 'nope' \(known: .*md.*qr.*table"):
        representation_class("nope")
    with pytest.raises(ValueError, match="representation 'table' registered twice"):
        register_representation("table")(type("Again", (TableBag,), {}))


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_exported_graph_uses_segment_sum_and_matches_eager(pooling):
    """Eager takes F.embedding_bag; the exported graph must take the Loop-free scatter_add form."""
    torch.manual_seed(0)
    table = TableBag(50, 8, pooling=pooling, weight=torch.randn(50, 8))
    idx = torch.tensor([3, 49, 0, 7, 7, 12, 49], dtype=torch.int64)
    off = torch.tensor([0, 2, 2, 5, 5, 7], dtype=torch.int64)       # empty bags included
    n, b = torch.export.Dim("n", min=2), torch.export.Dim("b", min=4)   # B >= 3: no 0/1 specialisation
    ep = torch.export.export(table, (idx, off), dynamic_shapes=({0: n}, {0: b}))
    ops = {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}
    assert any("scatter_add" in o for o in ops) and not any("embedding_bag" in o for o in ops)
    assert_close(ep.module()(idx, off), table(idx, off), "float32")


def test_fused_lookup_names_its_kind_and_defaults_to_the_stored_rows():
    from rewrite.core.embedding import FusedLookup

    with pytest.raises(ValueError, match="fused lookup kind must be one of rows, hash"):
        FusedLookup("gather", 4)
    t = TableBag(3, 4, weight=torch.arange(12.0).reshape(3, 4))
    look = t.fused_lookup()
    assert look.kind == "rows" and look.width == 4 and look.rows.format == "f32"
    assert torch.equal(look.rows.rows.view(torch.float32), t.weight.detach())
    assert TableBag(3, 4, dtype="bfloat16").fused_lookup() is None      # no standard layout: computed
