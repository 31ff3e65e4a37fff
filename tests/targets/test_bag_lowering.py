"""The bag ops lowered: onnx-cpu and tvm-llvm against eager on one-id, ragged, empty, one-long-bag
and largest-id batches, sum and mean pooling, fp32 / fp16 / bf16 tables; and what each engine gets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from passes.quotient_remainder import QRBag
from rewrite.core.batch import Batch
from rewrite.core.embedding import TableBag
from rewrite.core.model import ModelSpec, RecModel
from rewrite.core.timing import serving_batches
from targets.tvm import relax as tvm_relax
from targets.base import get_target
from rewrite.core.batch import split_bags_np
from tests.targets.checks import assert_matches_eager, lower_and_load
from tests.targets.onnx.test_cpu import all_ops
from tests.tolerances import path_tolerance

ROWS = (40, 300, 7, 1000, 64)


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(3)
    w = lambda r: torch.randn(r, 8, generator=g) * 0.3            # noqa: E731
    tables = {"sum": TableBag(40, 8, weight=w(40)),
              "mean": TableBag(300, 8, pooling="mean", weight=w(300)),
              "fp16": TableBag(7, 8, dtype="float16", weight=w(7)),
              "bf16": TableBag(1000, 8, pooling="mean", dtype="bfloat16", weight=w(1000)),
              "qr": QRBag(64, 8, 8, op="add")}                  # pools gathered rows: segment_sum
    with torch.no_grad():
        tables["qr"].weight_q.copy_(w(8))
        tables["qr"].weight_r.copy_(w(8))
    spec = ModelSpec(n_dense=3, bottom=(16, 8), top=(16, 1), features=tuple((f"f_{t}", t) for t in tables))
    torch.manual_seed(0)
    return RecModel(spec, tables).eval()


@pytest.fixture(scope="module", params=["onnx-cpu", "tvm-llvm"])
def lowered(request, model, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    _, runner = lower_and_load(get_target(request.param), model, out)
    return request.param, runner


def one_long_bag(batch: int) -> Batch:
    """Every feature's 500 ids in bag 0, all its other bags empty (the worst case for padded forms)."""
    rng = np.random.default_rng(5)
    ids = [np.append(rng.integers(0, r, 499), r - 1) for r in ROWS]
    lengths = np.zeros((len(ROWS), batch), dtype=np.int64)
    lengths[:, 0] = 500
    offsets = np.concatenate([[0], np.cumsum(lengths.reshape(-1))])
    return Batch(torch.zeros(batch, 3), torch.from_numpy(np.concatenate(ids)), torch.from_numpy(offsets))


@torch.inference_mode()
def check(runner, model, batches):
    atol, rtol = path_tolerance("fp32")
    for b in batches:
        want = model(*b.inputs()).numpy()
        got = runner(b.dense.numpy(), split_bags_np(b.indices.numpy(), b.offsets.numpy(), len(ROWS)))
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=f"batch {b.size}")


def test_ragged_empty_largest_id(model, lowered):
    assert_matches_eager(lowered[1], model, "fp32")


@pytest.mark.parametrize("batch", [1, 3, 2048])
def test_one_id_per_bag(model, lowered, batch):
    """Criteo's shape: ONNX takes its If's no-pooling branch, TVM the same kernel."""
    batches = [Batch(*(torch.from_numpy(a) for a in x)) for x in serving_batches(list(ROWS), 3, batch, 2, seed=1)]
    check(lowered[1], model, batches)


@pytest.mark.parametrize("batch", [1, 4])
def test_one_long_bag_and_all_others_empty(model, lowered, batch):
    b = one_long_bag(batch)
    assert b.offsets[1] == 500 and int(b.offsets[-1]) == 500 * len(ROWS)
    check(lowered[1], model, [b])


def test_onnx_graph_has_one_if_per_bag_op_and_no_elementwise_scatter(model, tmp_path):
    lower_and_load(get_target("onnx-cpu"), model, tmp_path)
    g = onnx.load(str(tmp_path / "model.onnx")).graph
    ifs = [n for n in g.node if n.op_type == "If" and "segment_sum" in n.output[0]]
    assert len(ifs) == 5                           # 4 tables + QR (combined, then pooled)
    assert {"ScatterND", "Gather", "CumSum"} <= all_ops(g)
    top = {n.op_type for n in g.node}
    assert "ScatterND" not in top and "Loop" not in all_ops(g)
    scatters = [n for n in g.node if n.op_type == "ScatterElements"]
    assert not scatters                            # no [n, D] index tensors at the top level


def test_tvm_cat_interaction_stacks_every_bag_in_one_kernel(model):
    from dataclasses import replace

    cat = RecModel(replace(model.spec, interaction="cat"), dict(model.embeddings)).eval()
    mod, _, _ = tvm_relax.to_relax(tvm_relax.export(cat), "tvm-llvm")
    kernels = [g.name_hint for g in mod.get_global_vars() if g.name_hint.startswith("bags_")]
    assert "relax.scatter_elements" not in tvm_relax.relax_ops(mod)
    assert "relax.concat" not in tvm_relax.relax_ops(mod)
    # cat([x, 5 bags]): one kernel pooling the sum tables in place and copying x and the two
    # mean tables' divided bags (pooled by their own kernels)
    assert sum(k.startswith("bags_6inputs_") for k in kernels) == 1
    assert {"bags_gather8bfloat16_to8", "bags_gather8float32_to8"} \
        == set(kernels) - {k for k in kernels if k.startswith("bags_6inputs_")}


def test_tvm_dot_interaction_is_left_whole_for_its_own_kernel(model):
    target = get_target("tvm-llvm")
    mod, _, _ = target.prepare(*tvm_relax.to_relax(tvm_relax.export(model), "tvm-llvm"))
    names = {g.name_hint for g in mod.get_global_vars()}
    assert "dot_interaction" in names                      # the stack, bmm, pairs and cat: one kernel
    assert "relax.concat" not in tvm_relax.relax_ops(mod)
    assert not any(n.startswith("bags_") and "inputs" in n for n in names)
