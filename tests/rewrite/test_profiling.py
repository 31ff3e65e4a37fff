"""Access profiling: counts against np.bincount, coverage / hot-set / Zipf numbers hand-computed on
a constructed dataset, Bernoulli input sampling, the JSON round trip and mismatch errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import rewrite
from rewrite import data
from rewrite.core.errors import RewriteError
from rewrite.core.access_profile import AccessProfile, TableProfile
from rewrite.profiling import profile
from rewrite.core.synthetic import Synthetic, SyntheticConfig, write_npz
from rewrite.training import table_dlrm


def test_counts_match_bincount(day_files):
    model = rewrite.load(day_files.model)
    ds = data.open(day_files.data)
    prof = profile(model, ds)
    assert prof.samples == day_files.n_samples and prof.sample_rate == 1.0
    for f, (name, rows) in enumerate(zip(["t0", "t1", "t2", "t3"], day_files.rows)):
        assert np.array_equal(prof.counts(name), np.bincount(np.asarray(ds.cat[:, f]), minlength=rows))
        assert prof.tables[name].lookups == day_files.n_samples


@pytest.fixture
def constructed(tmp_path):
    """100 samples.  t0 (100 rows, dim 4): row 7 x50, row 3 x30, rows 10..19 x2 each.
    t1 (60 rows): every sample looks up row 0."""
    ids = np.array([7] * 50 + [3] * 30 + [r for r in range(10, 20) for _ in range(2)])
    np.random.default_rng(0).shuffle(ids)
    x_cat = np.stack([ids, np.zeros(100, dtype=np.int64)], axis=1).astype(np.int32)
    write_npz(tmp_path / "d.npz", np.zeros((100, 13), dtype=np.int32), x_cat, np.zeros(100, dtype=np.int32))
    model = table_dlrm([100, 60], n_dense=13, dim=4, bottom=(8, 4), top=(4, 1))
    return model, data.open(tmp_path / "d.npz")


def test_hand_computed_statistics(constructed):
    model, ds = constructed
    t0, t1 = profile(model, ds).tables.values()
    assert (t0.lookups, int((t0.counts > 0).sum())) == (100, 12)
    assert t0.coverage_of_top(0.01) == pytest.approx(0.50)       # 1 row: row 7
    assert t0.coverage_of_top(0.10) == pytest.approx(0.96)       # 10 rows: 50 + 30 + 8*2
    assert t0.hot_rows_for_coverage(0.80) == 2                   # 50 + 30 = 80 exactly
    assert t0.hot_rows_for_coverage(0.90) == 7                   # 80 + 5*2 = 90
    assert t0.hot_rows_for_coverage(1.00) == 12
    assert list(t0.ranked()[:4]) == [7, 3, 10, 11]               # ties broken by row id
    s = t0.summary(0.9, hot_bytes=48)                            # 48 B / (4 dims * 4 B) = 3 rows
    assert (s["hot_rows_in_budget"], s["hot_budget_coverage"]) == (3, pytest.approx(0.82))
    assert (t1.coverage_of_top(0.01), t1.hot_rows_for_coverage(0.9)) == (1.0, 1)
    assert np.isnan(t1.zipf_exponent())                          # fewer than 3 touched rows


def test_zipf_exponent_of_exact_power_law():
    r = np.arange(1, 201)
    counts = np.zeros(500, dtype=np.int64)
    counts[np.random.default_rng(1).permutation(500)[:200]] = np.round(1e6 * r ** -1.2).astype(np.int64)
    assert TableProfile("t", 500, 4, counts).zipf_exponent() == pytest.approx(1.2, abs=0.01)


def test_empty_table_profile():
    t = TableProfile("t", 10, 4, np.zeros(10, dtype=np.int64))
    assert (t.lookups, t.hot_rows_for_coverage(0.9), t.coverage_of_top(0.1)) == (0, 0, 0.0)


def test_sample_rate_is_an_unbiased_sample(tmp_path):
    """The demo's exact setting (generator seed 0, day seed 0, profile seed 0, 5%): the sample must
    not be correlated with the ids (it once picked exactly the rows holding the hottest id)."""
    gen = Synthetic(SyntheticConfig(rows=(1000, 50), n_pairs=1, seed=0))
    write_npz(tmp_path / "d.npz", *gen.sample(40_000, seed=0))
    ds = data.open(tmp_path / "d.npz")
    model = table_dlrm([1000, 50], n_dense=13, dim=4, bottom=(8, 4), top=(4, 1))
    full, part = profile(model, ds), profile(model, ds, sample_rate=0.05)
    assert abs(part.samples - 2000) < 4 * np.sqrt(2000) and part.sample_rate == 0.05
    assert np.all(part.counts("t0") <= full.counts("t0"))
    for name in ("t0", "t1"):
        a, b = full.tables[name], part.tables[name]
        assert b.lookups == part.samples
        assert b.coverage_of_top(0.01) == pytest.approx(a.coverage_of_top(0.01), abs=0.03), name
        assert b.coverage_of_top(0.10) == pytest.approx(a.coverage_of_top(0.10), abs=0.03), name
    again = profile(model, ds, sample_rate=0.05)
    assert np.array_equal(again.counts("t0"), part.counts("t0"))


def test_json_round_trip(constructed, tmp_path):
    model, ds = constructed
    prof = profile(model, ds, sample_rate=0.5, seed=3)
    prof.save(tmp_path / "p.json", coverage=0.8, hot_bytes=64)
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["version"] == 1 and d["coverage_target"] == 0.8 and d["hot_bytes"] == 64
    assert [t["name"] for t in d["tables"]] == ["t0", "t1"]
    assert d["tables"][0]["hot_rows_in_budget"] == 4
    back = AccessProfile.load(tmp_path / "p.json", model)
    assert (back.samples, back.sample_rate, back.source) == (prof.samples, 0.5, str(ds.path))
    for name in ("t0", "t1"):
        assert np.array_equal(back.counts(name), prof.counts(name))
        assert back.tables[name].dim == 4
    assert AccessProfile.load(tmp_path / "p.json").tables["t0"].rows == 100


def test_mismatching_or_broken_profile_refused(constructed, tmp_path):
    model, ds = constructed
    profile(model, ds).save(tmp_path / "p.json")
    other = table_dlrm([100, 61], n_dense=13, dim=4, bottom=(8, 4), top=(4, 1))
    with pytest.raises(RewriteError, match=r"p\.json: profile does not match the model \(table t1\)"):
        AccessProfile.load(tmp_path / "p.json", other)
    bigger = table_dlrm([100, 60, 5], n_dense=13, dim=4, bottom=(8, 4), top=(4, 1))
    with pytest.raises(RewriteError, match=r"profile does not match the model \(table t2\)"):
        AccessProfile.load(tmp_path / "p.json", bigger)
    (tmp_path / "bad.json").write_text("{\"tables\": [")
    with pytest.raises(RewriteError, match=r"bad\.json: not a dlrm-rewrite profile \(JSONDecodeError"):
        AccessProfile.load(tmp_path / "bad.json")
    d = json.loads((tmp_path / "p.json").read_text())
    d["tables"][1]["rows"] = 0                                  # counts name rows beyond it
    (tmp_path / "rows.json").write_text(json.dumps(d))
    with pytest.raises(RewriteError, match="counts do not match the table's rows"):
        AccessProfile.load(tmp_path / "rows.json")
    with pytest.raises(RewriteError, match="no such profile file"):
        AccessProfile.load(tmp_path / "absent.json")


def test_data_that_does_not_fit_the_model(constructed, tmp_path):
    model, ds = constructed
    small = table_dlrm([5, 60], n_dense=13, dim=4, bottom=(8, 4), top=(4, 1))
    with pytest.raises(RewriteError, match=r"d\.npz: feature 0 has ids outside table t0's range \[0, 5\) \(max 19\)"):
        profile(small, ds)
    three = table_dlrm([100, 60, 9], n_dense=13, dim=4, bottom=(8, 4), top=(4, 1))
    with pytest.raises(RewriteError, match="data has 13 dense and 2 categorical columns, the model takes 13 and 3"):
        profile(three, ds)
