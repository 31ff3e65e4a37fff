"""The synthetic Criteo-shaped generator: reproducible from its seeds, Zipf-skewed ids with the
configured exponent (measured), positives and teacher AUC where its docstring says; and the
ragged test batches every numerical test uses."""

from __future__ import annotations

import numpy as np
import pytest

from rewrite.core.batch import validate
from rewrite.core.metrics import auc
from rewrite.core.synthetic import KAGGLE_ROWS, Synthetic, SyntheticConfig, demo_rows, multi_hot_batch

SMALL = SyntheticConfig(rows=(1000, 50, 3), n_pairs=2, seed=5)


def test_seeded_and_reproducible():
    a = Synthetic(SMALL).sample(500, seed=1)
    b = Synthetic(SMALL).sample(500, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = Synthetic(SMALL).sample(500, seed=2)
    assert not np.array_equal(a[1], c[1])
    other = Synthetic(SyntheticConfig(rows=SMALL.rows, n_pairs=2, seed=6)).sample(500, seed=1)
    assert not np.array_equal(a[1], other[1])


def test_shapes_ranges_and_dtypes():
    x_int, x_cat, y = Synthetic(SMALL).sample(2000, seed=0)
    assert x_int.shape == (2000, 13) and x_cat.shape == (2000, 3) and y.shape == (2000,)
    assert x_int.dtype == np.int32 and x_cat.dtype == np.int32
    assert x_int.min() == -1                         # count-like, a few -1 as in Criteo
    for f, rows in enumerate(SMALL.rows):
        assert 0 <= x_cat[:, f].min() and x_cat[:, f].max() < rows
    assert set(np.unique(y)) == {0, 1}


def test_zipf_skew_measured():
    """Rank-frequency of 200k draws from a 1000-row table follows P(r) ∝ (r+1)^-zipf."""
    for zipf in (0.8, 1.05, 1.3):
        gen = Synthetic(SyntheticConfig(rows=(1000,), n_pairs=0, zipf=zipf, seed=0))
        ids = gen.ids(200_000, np.random.default_rng(7))[:, 0]
        counts = np.sort(np.bincount(ids, minlength=1000))[::-1]
        ranks = np.arange(1, 101)
        slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
        assert -slope == pytest.approx(zipf, abs=0.08), zipf
        p = np.arange(1, 1001) ** -zipf
        p /= p.sum()
        assert counts[:10].sum() / 200_000 == pytest.approx(p[:10].sum(), abs=0.01)
        hottest = int(np.argmax(np.bincount(ids, minlength=1000)))
        assert hottest == gen.perm[0][0]              # rank 0 maps through the permutation


def test_hot_rows_are_permuted():
    gen = Synthetic(SyntheticConfig(rows=(5000,), n_pairs=0, seed=0))
    assert not np.array_equal(gen.perm[0][:20], np.arange(20))


def test_positive_rate_and_teacher_auc_as_documented():
    """Defaults: ≈ 27% positives, teacher AUC ≈ 0.88 (synthetic.py docstring)."""
    gen = Synthetic()
    assert gen.cfg.rows == demo_rows() and len(gen.cfg.rows) == len(KAGGLE_ROWS) == 26
    for seed in (0, 1):
        x_int, x_cat, y = gen.sample(20_000, seed=seed)
        assert 0.24 <= y.mean() <= 0.31
        assert 0.85 <= auc(y, gen.teacher_probability(x_int, x_cat)) <= 0.90


def test_positive_rate_follows_bias():
    rates = [Synthetic(SyntheticConfig(rows=(100, 100), n_pairs=1, bias=b)).sample(5000, 0)[2].mean()
             for b in (-3.0, 0.0, 3.0)]
    assert rates[0] < 0.2 and 0.4 < rates[1] < 0.6 and rates[2] > 0.8


def test_multi_hot_batch():
    rows = [2, 17, 300, 1000]
    b = multi_hot_batch(rows, 64, 5, mean_len=3.0, seed=0, empty_fraction=0.2)
    validate(b, 5, rows)                                      # offsets and ids are well formed
    lengths = (b.offsets[1:] - b.offsets[:-1]).view(4, 64)
    assert 0.15 < float((lengths == 0).float().mean()) < 0.35
    assert int(lengths.max()) > 1                             # multi-hot
    assert [int(ids.max()) for ids in b.feature_ids(4)] == [r - 1 for r in rows]
    again = multi_hot_batch(rows, 64, 5, mean_len=3.0, seed=0, empty_fraction=0.2)
    assert all(np.array_equal(x, y) for x, y in zip(b.inputs(), again.inputs()))
    empty = multi_hot_batch(rows, 8, 5, mean_len=3.0, seed=0, empty_fraction=1.0)
    assert empty.indices.numel() == 0 and empty.offsets.tolist() == [0] * 33


def test_lowrank_structure_keeps_ids_and_makes_the_teacher_tables_low_rank():
    """The realistic option: same ids / dense / noise draws as the default, per-id parameters of
    unit variance whose table [s, u] is rank r + 1 up to the idiosyncratic share, and s follows
    popularity (correlation sin φ with the standardised −log rank)."""
    cfg = SyntheticConfig(rows=(4000, 50), n_pairs=1, seed=3)
    low = SyntheticConfig(**{**vars(cfg), "structure": "lowrank", "rank": 3, "idiosyncratic": 0.1})
    a, b = Synthetic(cfg), Synthetic(low)
    xa, xb = a.sample(3000, seed=1), b.sample(3000, seed=1)
    assert np.array_equal(xa[0], xb[0]) and np.array_equal(xa[1], xb[1])        # same ids and dense
    table = np.concatenate([b.s[0][:, None], b.u[0]], axis=1)                   # [rows, 1 + k]
    sv = np.linalg.svd(table - table.mean(0), compute_uv=False)
    energy = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    assert energy[3] > 0.97                                 # rank r + 1 = 4 holds ~ 1 - η² of it
    indep = np.concatenate([a.s[0][:, None], a.u[0]], axis=1)
    sv_i = np.linalg.svd(indep - indep.mean(0), compute_uv=False)
    assert (np.cumsum(sv_i ** 2) / np.sum(sv_i ** 2))[3] < 0.85
    assert abs(float(b.u[0].std()) - 1) < 0.1 and 0.5 < float(b.s[0].std()) < 1.5
    rank_of_row = np.argsort(b.perm[0])
    assert np.corrcoef(b.s[0], -np.log(rank_of_row + 1.0))[0, 1] > 0.15     # popular ids: larger s
    assert abs(xb[2].mean() - xa[2].mean()) < 0.05              # positives stay comparable


def test_unknown_structure_is_refused():
    with pytest.raises(ValueError, match="structure must be 'independent' or 'lowrank'"):
        Synthetic(SyntheticConfig(rows=(10,), n_pairs=0, structure="clustered"))
