"""capture: an fx GraphModule whose table lookups are visible call_module nodes, one site per table."""

from __future__ import annotations

import torch

import rewrite
from passes.mixed_dim import MDBag
from passes.quotient_remainder import QRBag
from rewrite.core.embedding import TableBag
from rewrite.core.model import ModelSpec, RecModel
from tests.conftest import ROWS


def _lookups(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("embeddings.")]


def test_one_lookup_node_per_feature(small_dlrm, ragged_batch):
    gm, sites = rewrite.capture(small_dlrm)
    gm.graph.lint()
    nodes = _lookups(gm)
    assert [n.target for n in nodes] == [f"embeddings.t{i}" for i in range(len(ROWS))]
    splits = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "split_bags"]
    assert len(splits) == 1                                      # one leaf feeds every lookup
    with torch.no_grad():
        assert torch.equal(gm(*ragged_batch.inputs()), small_dlrm(*ragged_batch.inputs()))
    assert [s.name for s in sites] == ["t0", "t1", "t2", "t3"]
    for s, node, rows in zip(sites, nodes, ROWS):
        assert s.nodes == (node.name,) and s.features == (f"f{s.name[1:]}",)
        assert (s.rows, s.dim, s.pooling, s.representation) == (rows, 8, "sum", "table")
        assert s.bytes == rows * 8 * 4
        assert s.module_path == f"embeddings.{s.name}" and s.module(gm) is small_dlrm.embeddings[s.name]


def test_sites_of_other_representations_and_shared_tables(make_batch):
    g = torch.Generator().manual_seed(0)
    qr = QRBag(300, 8, 4, op="mult")
    md = MDBag(1000, 8, 3, pooling="mean")
    for p in (*qr.parameters(), *md.parameters()):
        p.data = torch.randn(p.shape, generator=g)
    tables = {"t0": TableBag(2, 8, weight=torch.randn(2, 8, generator=g), dtype="float16"), "t2": qr, "t3": md}
    features = (("a", "t0"), ("b", "t2"), ("c", "t2"), ("d", "t3"))
    spec = ModelSpec(n_dense=5, bottom=(16, 8), top=(8, 1), features=features)
    model = RecModel(spec, tables).eval()
    gm, sites = rewrite.capture(model)
    gm.graph.lint()
    by_name = {s.name: s for s in sites}
    assert len(by_name["t2"].nodes) == 2 and by_name["t2"].features == ("b", "c")
    assert (by_name["t2"].representation, by_name["t2"].bytes) == ("qr", (75 + 4) * 8 * 4)
    assert (by_name["t3"].representation, by_name["t3"].pooling) == ("md", "mean")
    assert by_name["t3"].bytes == (1000 * 3 + 8 * 3) * 4
    assert by_name["t0"].bytes == 2 * 8 * 2
    batch = make_batch(rows=(2, 300, 300, 1000), batch=20, seed=2)
    with torch.no_grad():
        assert torch.equal(gm(*batch.inputs()), model(*batch.inputs()))
