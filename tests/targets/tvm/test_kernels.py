"""tvm-llvm's packed dense and dot-interaction kernels: the rewrite finds them, and the compiled
model matches eager on a Kaggle-shaped model (every stage width) at batch 1, odd sizes and 2048."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.kaggle_model import kaggle_model
from rewrite.core.model import ModelSpec, RecModel, interaction_pairs
from rewrite.core.embedding import TableBag
from rewrite.core.synthetic import multi_hot_batch
from targets.base import get_target
from rewrite.core.batch import split_bags_np
from targets.tvm.dense import kernel_shape, pack_weight
from targets.tvm.interaction import pair_runs
from targets.tvm import relax as tvm_relax
from tests.tolerances import assert_close

ROWS = (50, 7, 300) + (20,) * 23          # 26 features, small tables


@pytest.mark.parametrize("order", ["dlrm", "dlrm-self", "torchrec"])
def test_every_pair_order_is_row_runs(order):
    n = 27
    flat = np.array([i * n + j for i, j in interaction_pairs(n, order)])
    runs = pair_runs(flat, n)
    assert runs is not None
    assert [(i, j) for i, lo, hi in runs for j in range(lo, hi)] == interaction_pairs(n, order)


def test_pairs_that_are_not_row_runs_are_refused():
    assert pair_runs(np.array([1 * 4 + 0, 2 * 4 + 0, 1 * 4 + 1]), 4) is None    # row 1 split
    assert pair_runs(np.array([0, 20]), 4) is None                               # out of range


def test_packed_weight_layout():
    w = np.arange(64 * 5, dtype=np.float32).reshape(64, 5)
    rows, tile = kernel_shape(64)
    p = pack_weight(w, tile)
    assert p.shape == (64 // tile, 5, tile) and rows * tile * 4 < 1024
    assert all(p[q, k, c] == w[q * tile + c, k] for q in range(2) for k in range(5) for c in range(tile))
    assert kernel_shape(1) is None and kernel_shape(16) == (14, 16)


def _bags(model, b):
    return split_bags_np(b.indices.numpy(), b.offsets.numpy(), len(model.spec.features))


@pytest.mark.slow
def test_kaggle_shaped_model_matches_eager(tmp_path):
    torch.set_num_threads(1)
    model = kaggle_model(ROWS)
    target = get_target("tvm-llvm")
    mod, _, _ = target.prepare(*tvm_relax.to_relax(tvm_relax.export(model), "tvm-llvm"))
    kernels = sorted(gv.name_hint for gv in mod.functions if gv.name_hint != "main")
    assert [k for k in kernels if k.startswith(("dense", "dot"))] == [
        "dense_13_512_relu", "dense_256_64_relu", "dense_367_512_relu", "dense_512_256_relu",
        "dense_64_16_relu", "dot_interaction"]      # 512 -> 256 appears in both MLPs: one kernel
    path = target.lower(model, None, tmp_path)
    # the packed weights are constants now: only the 1-wide last layer and biases stay inputs
    weights = [n for n in path.options["params"] if n.endswith("weight") and "embeddings" not in n]
    assert weights == ["p_model_top_4_weight"]
    run = target.load(tmp_path, path, threads=1)
    for size in (1, 2, 7, 13, 2048):
        b = multi_hot_batch(list(ROWS), size, model.spec.n_dense, 2, seed=size)
        with torch.no_grad():
            ref = model(*b.inputs()).numpy()
        assert_close(run(b.dense.numpy(), _bags(model, b)), ref, "compiled-fp32-logits", f"B={size}")


@pytest.mark.slow
@pytest.mark.parametrize("order", ["dlrm-self", "torchrec"])
def test_other_pair_orders_and_widths_match_eager(tmp_path, order):
    """d = 8 (a half vector), bottom/top widths 48 and 16 (tile 16), the diagonal kept or the
    upper triangle: the interaction kernel and the dense kernel's one-vector tile."""
    torch.manual_seed(1)
    tables = {f"t{i}": TableBag(30 + i, 8) for i in range(5)}
    for t in tables.values():
        torch.nn.init.uniform_(t.weight, -1, 1)
    spec = ModelSpec(n_dense=4, bottom=(48, 8), top=(16, 1), pairs=order,
                     features=tuple((f"f{i}", f"t{i}") for i in range(5)))
    model = RecModel(spec, tables).eval()
    target = get_target("tvm-llvm")
    path = target.lower(model, None, tmp_path)
    run = target.load(tmp_path, path, threads=1)
    for size in (1, 5, 64):
        b = multi_hot_batch([30 + i for i in range(5)], size, 4, 2, seed=size)
        with torch.no_grad():
            ref = model(*b.inputs()).numpy()
        assert_close(run(b.dense.numpy(), _bags(model, b)), ref, "compiled-fp32-logits", f"B={size}")
