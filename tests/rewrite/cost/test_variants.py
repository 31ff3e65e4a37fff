"""Enumeration: the grid, skips with reasons, and quality measured per variant."""

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from rewrite.cost.variants import enumerate_variants, grid_passes, restrict, table_stats
from rewrite.pass_manager import table_bags
from tests.rewrite.cost.conftest import sample_of, synthetic_hw


def reference_auc(y, scores):
    """AUC as the Mann-Whitney U statistic (scipy), independent of rewrite.core.metrics."""
    pos, neg = scores[y == 1], scores[y == 0]
    return mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))


def test_grid_is_parsed_and_bad_entries_are_reported(test_passes):
    grid = {**test_passes, "test-svd": ("inner_dim=2", "bogus=1")}
    configured, skipped = grid_passes(grid)
    names = sorted(str(cp) for cp in configured)
    assert names == ["onehot", "test-half", "test-half:dtype=float16", "test-svd:inner_dim=2"]  # TEST_GRID has onehot
    assert skipped == [{"table": "*", "pass": "test-svd:bogus=1",
                        "reason": "grid entry does not parse: pass test-svd: unknown option 'bogus' "
                                  "(options: inner_dim, min_rows, tables)"}]


def test_variants_carry_measured_quality_and_exact_bytes(trained, test_passes):
    model, npz, _ = trained
    sample = sample_of(npz)
    enum = enumerate_variants(model, synthetic_hw(), sample, grid=test_passes, progress=False)
    assert enum.labelled
    y = np.concatenate([b.labels.numpy() for b in sample])
    with torch.no_grad():
        base = np.concatenate([model(*b.inputs()).numpy() for b in sample])
    # abs 1e-6: MKL's GEMMs are not bit-reproducible across buffers, near-ties can flip
    assert enum.auc_base == pytest.approx(reference_auc(y, base), abs=1e-6)
    for t, vs in enum.variants.items():
        assert vs[0].pass_spec is None and vs[0].auc_drop == 0.0 and vs[0].rel_error == 0.0
        for v in vs:
            rep = enum.reps[v.key]
            assert v.num_bytes == rep.num_bytes() and v.tier == "dram"
            if v.pass_spec is None:
                continue
            with torch.no_grad():
                z = np.concatenate([model.with_tables({t: rep})(*b.inputs()).numpy() for b in sample])
            assert v.auc_drop == pytest.approx(max(0.0, enum.auc_base - reference_auc(y, z)), abs=1e-6)
            num = den = 0.0
            with torch.no_grad():
                for idx, off in table_bags(model, sample, t):
                    a, b = model.embeddings[t](idx, off), rep(idx, off)
                    num += float(((a - b) ** 2).sum())
                    den += float((a ** 2).sum())
            assert v.rel_error == pytest.approx((num / den) ** 0.5, rel=1e-5)
    t0 = {v.pass_spec: v for v in enum.variants["t0"]}
    assert t0["test-half"].num_bytes == 3000 * 8 * 2                # bf16 table
    assert t0["test-svd:inner_dim=1"].num_bytes == (3000 * 1 + 8 * 1) * 4
    assert "onehot" not in t0 and "onehot" in {v.pass_spec for v in enum.variants["t3"]}
    assert {"table": "t0", "pass": "onehot", "reason": "3000 rows > max_rows=128"} in enum.skipped
    # a rank-1 factorisation of the 3000-row table loses signal: measurably lower AUC
    assert t0["test-svd:inner_dim=1"].auc_drop > 0.001 and t0["test-svd:inner_dim=1"].rel_error > 0.3
    kept = restrict(enum, max_rel_error=0.01).variants["t0"]
    assert [v.pass_spec for v in kept] == [None, "test-half", "test-half:dtype=float16"]


def test_every_placeable_tier_is_a_variant(trained, test_passes):
    from rewrite.cost.hardware import load_hardware

    model, npz, _ = trained
    enum = enumerate_variants(model, load_hardware("a100"), sample_of(npz, 2048),
                              grid={"test-half": ("",)}, progress=False)
    # only the grid's passes are enumerated (every registered pass is not: a grid is a choice)
    assert sorted((v.pass_spec or "keep", v.tier) for v in enum.variants["t3"]) == \
        [("keep", "hbm"), ("keep", "host"), ("test-half", "hbm"), ("test-half", "host")]


def test_unlabelled_sample_has_no_auc(trained, test_passes):
    model, npz, _ = trained
    sample = sample_of(npz, 2048)
    for b in sample:
        b.labels = None
    enum = enumerate_variants(model, synthetic_hw(), sample, grid={"test-half": ("",)}, progress=False)
    assert not enum.labelled and enum.auc_base is None
    assert all(v.auc_drop == 0.0 and v.quality_source == "unmeasured"
               for vs in enum.variants.values() for v in vs)


def test_table_stats_from_the_sample_and_profile(trained):
    from rewrite import data
    from rewrite.profiling import profile

    model, npz, _ = trained
    stats = table_stats(model, profile(model, data.open(npz)), sample_of(npz, 2048))
    assert all(s.lookups_per_bag == 1.0 and s.cache_share == 0.25 for s in stats.values())
    assert stats["t3"].coverage(1.0) == 1.0 and stats["t0"].coverage(0.1) > 0.1   # skewed ids
