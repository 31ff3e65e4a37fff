import itertools

import numpy as np
import pytest
import torch

import passes
import rewrite
from passes.dim_pruning import PrunedDimBag, allocate, remap_layout
from rewrite.core.embedding import TableBag
from rewrite.core.tracing import capture
from tests.pass_helpers import spec_error
from tests.helpers import (assert_exports, assert_roundtrip, ragged_batches, reference_bags,
                           small_model, table_bags)
from tests.tolerances import assert_close

def levels_of(rep: PrunedDimBag) -> np.ndarray:
    packed = rep.remap.to(torch.int64).numpy()
    return packed >> rep.offset_bits


def test_remap_layout_is_the_narrowest_that_fits():
    assert remap_layout([8192, 0, 5, 0], 4) == ("int16", 13)       # 2-bit level, 13-bit offset
    assert remap_layout([8193, 0, 0, 0], 4) == ("int32", 29)
    assert remap_layout([16384, 0], 2) == ("int16", 14)
    with pytest.raises(ValueError, match="does not fit an int32 remap"):
        remap_layout([2**29 + 1, 0, 0, 0], 4)


def test_pass_numerics_rows_and_bytes_by_hand(model, profile):
    rw, report = rewrite.apply(model, [passes.prune_dims(tables=("t0",))], profile=profile)
    rep, w = rw.embeddings["t0"], model.embeddings["t0"].weight.detach().double()
    notes = report.tables[0].notes
    n16, n8, n4, n0 = notes["rows_per_level"]
    assert rep.levels == (16, 8, 4, 0) and n16 + n8 + n4 + n0 == 1000
    assert rep.remap.dtype == torch.int16 and notes["remap_bytes"] == 2000
    assert rep.num_bytes() == 4 * (16 * n16 + 8 * n8 + 4 * n4) + 2 * 1000 + 4 * 16 * 16
    assert notes["kept_values_share"] == pytest.approx(0.5, abs=0.01) and notes["kept_values_share"] <= 0.5
    dense = rep.dense_rows(torch.arange(1000)).detach().double()
    level = levels_of(rep)
    v = rep.rotation.detach().double().T                            # columns: the PCA basis
    for l, d in enumerate(rep.levels):
        rows = torch.from_numpy(np.flatnonzero(level == l))
        proj = v[:, :d] @ v[:, :d].T                                # kept rows = W projected
        assert_close(dense[rows], w[rows] @ proj, "projected-rows", f"level {l} (d={d})")
    for batch in ragged_batches(model):                             # gather/mask/pad/pool path
        idx, off = table_bags(batch, model, "t0")
        assert_close(rw.embeddings["t0"](idx, off), reference_bags(dense, idx, off), "pooled-fp32",
                     "pruned t0 lookups")
    capture(rw)[0].graph.lint()


def test_hot_rows_get_more_dims(model, profile):
    rw, report = rewrite.apply(model, [passes.prune_dims(keep=0.25, tables=("t0",))], profile=profile)
    counts = profile.counts("t0")
    dims = np.asarray(rw.embeddings["t0"].levels)[levels_of(rw.embeddings["t0"])]
    hot = np.argsort(-counts)[:100]
    assert dims[hot].mean() > 2 * dims.mean()
    share = report.tables[0].notes["lookup_share_per_level"]
    assert len(share) == 4 and sum(share) == pytest.approx(1.0) and share[0] > 0.5


def test_allocation_is_lagrangian_optimal():
    rng = np.random.default_rng(0)
    cost = np.sort(rng.random((6, 4)) * rng.random((6, 1)) * 10, axis=1)[:, ::-1].copy()
    cost[:, 0] = 0.0
    level_bytes = np.array([64.0, 32.0, 16.0, 0.0])
    for budget in (100.0, 200.0, 300.0):
        choice = allocate(cost, level_bytes, budget)
        spent = level_bytes[choice].sum()
        assert spent <= budget
        best = min(cost[np.arange(6), c].sum() for c in itertools.product(range(4), repeat=6)
                   if level_bytes[list(c)].sum() <= spent)
        assert cost[np.arange(6), choice].sum() <= best + 1e-12


def test_pca_rotation_helps_an_anisotropic_table(profile):
    m = small_model()
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    with torch.no_grad():
        m.embeddings["t0"].weight.copy_(torch.randn(1000, 16, generator=g) * torch.logspace(0, -2, 16) @ basis.T)
    errs = [rewrite.apply(m, [passes.prune_dims(keep=0.3, rotate=r, tables=("t0",))],
                          profile=profile)[1].tables[0].notes["weighted_rel_error"] for r in (True, False)]
    assert errs[0] < 0.5 * errs[1]


def test_budget_counts_remap_and_rotation(model, profile):
    rw, report = rewrite.apply(model, [passes.prune_dims(budget="20KB", tables=("t0",))], profile=profile)
    assert rw.embeddings["t0"].num_bytes() <= 20_000
    assert rw.embeddings["t0"].num_bytes() >= 20_000 - 64         # at most one widest row short


def test_roundtrip_export_without_rotation_and_mean_pooling(model, profile, tmp_path):
    mean = model.with_tables({"t1": TableBag(300, 16, pooling="mean",
                                             weight=model.embeddings["t1"].weight.detach())})
    rw, _ = rewrite.apply(mean, [passes.prune_dims(keep=0.3, rotate=False, levels=(16, 12, 2, 0))],
                          profile=profile)
    rep = rw.embeddings["t1"]
    assert rep.pooling == "mean" and not rep.rotate and "rotation" not in rep.state_dict()
    dense = rep.dense_rows(torch.arange(300)).detach().double()
    batch = ragged_batches(mean, n=1)[0]
    idx, off = table_bags(batch, mean, "t1")
    assert_close(rep(idx, off), reference_bags(dense, idx, off, "mean"), "pooled-fp32", "pruned t1, mean")
    assert_roundtrip(rw, tmp_path, batch)
    assert_exports(rw, batch)


def test_skip_reasons(model, profile):
    half = model.with_tables({"t2": TableBag(37, 16, dtype="float16",
                                             weight=model.embeddings["t2"].weight.detach())})
    cases = [
        (half, passes.prune_dims(tables=("t2",)),
         "prune-dims rewrites fp32 plain tables, this is table 37x16 float16"),
        (model, passes.prune_dims(levels=(32, 16), tables=("t0",)), "levels 32,16 exceed the table's dim 16"),
        (model, passes.prune_dims(budget="3000B", tables=("t0",)),
         "budget=3000B is below the remap + rotation (3024 bytes)"),
        (model, passes.prune_dims(budget="3030B", tables=("t0",)),
         "the budget keeps no values (every row at 0 dims; 6 bytes for values)"),
        (model, passes.prune_dims(keep=0.9, tables=("t2",)), "the pruned table takes 3210 bytes >= the table's 2368"),
    ]
    for m, cp, reason in cases:
        t = rewrite.apply(m, [cp], profile=profile)[1].tables[0]
        assert (t.status, t.reason) == ("skipped", reason)


@pytest.mark.parametrize("text, message", [
    ("prune-dims:keep=0.5:budget=1MB", "give one of keep, budget, compression (got keep, budget)"),
    ("prune-dims:keep=1.5", "keep must be in (0, 1), got 1.5"),
    ("prune-dims:budget=lots", "budget: cannot read 'lots' as a byte size (e.g. 512MB, 1.5GiB, 4096)"),
    ("prune-dims:levels=8,16", "levels must be distinct non-negative dims, descending (got (8, 16))"),
    ("prune-dims:levels=16", "give at least 2 levels"),
    ("prune-dims:beta=-1", "beta must be >= 0, got -1.0"),
    ("prune-dims:max_error=2", "max_error must be in (0, 1), got 2.0"),
])
def test_config_errors(text, message):
    assert spec_error(text) == f"pass prune-dims: {message}"


def test_representation_rejects_bad_counts():
    with pytest.raises(ValueError, match="do not add up to 10 rows"):
        PrunedDimBag(10, 4, [4, 0], [5, 4])
    with pytest.raises(ValueError, match="every row is at 0 dims"):
        PrunedDimBag(10, 4, [4, 0], [0, 10])
