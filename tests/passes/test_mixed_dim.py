"""md: frequency-weighted truncated SVD, energy and popularity rules, budget, skips, round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import passes
import rewrite
from passes.mixed_dim import MDBag, energy_dim, fit_md
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.pass_contract import parse_pass
from rewrite.pass_manager import apply
from tests.pass_helpers import assert_exports, batches, profile_of, small_model, with_table, spec_error
from tests.tolerances import assert_close

torch.set_num_threads(1)


def low_rank(rows: int, dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, dim, generator=g) * 0.2


def test_exact_on_a_low_rank_table():
    w = low_rank(1000, 8, 3)
    model = with_table(small_model(), "t3", w)
    sample = batches(model)
    rw, report = apply(model, [passes.md(energy=1.0, tables=("t3",))], sample=sample)
    t3 = rw.embeddings["t3"]
    assert isinstance(t3, MDBag) and t3.inner_dim == 3
    for b in sample:
        assert_close(rw(*b.inputs()), model(*b.inputs()), "float32")
    assert report.tables[0].rel_error < 1e-5


def test_weighted_fit_matches_weighted_svd_reference():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(500, 8, generator=g)
    weights = np.random.default_rng(0).pareto(1.0, 500) + 0.1
    rep = fit_md(w, weights, 3)
    # reference: SVD of diag(√w) W, keep 3, unscale (the brief's recipe, computed independently)
    s = np.sqrt(weights)[:, None]
    u, sv, vt = np.linalg.svd(s * w.numpy().astype(np.float64), full_matrices=False)
    ref = (u[:, :3] * sv[:3]) @ vt[:3] / s
    got = rep.dense_rows(torch.arange(500)).detach().numpy().astype(np.float64)
    assert_close(got, ref, "low-rank-fit", "weighted rank-3 fit vs float64 SVD")
    # the weighted residual is the discarded share of the weighted spectrum
    resid = float((weights[:, None] * (w.numpy() - got) ** 2).sum())
    assert math.isclose(resid, float((sv[3:] ** 2).sum()), rel_tol=1e-4)


def test_frequency_weighting_favours_hot_rows():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(400, 8, generator=g)
    hot = np.zeros(400)
    hot[:2] = 10_000.0        # two hot rows: a rank-2 fit can hold them almost exactly
    weighted, uniform = fit_md(w, hot + 1, 2), fit_md(w, np.ones(400), 2)
    ids = torch.arange(2)
    err = lambda rep: float((rep.dense_rows(ids).detach() - w[:2]).norm())  # noqa: E731
    assert err(weighted) < 0.05 * err(uniform)


def test_energy_dim():
    vals = np.array([5.0, 3.0, 1.0, 0.5, 0.5])
    assert energy_dim(vals, 0.5) == 1
    assert energy_dim(vals, 0.8) == 2     # 8/10 reaches 0.8 exactly
    assert energy_dim(vals, 0.81) == 3
    assert energy_dim(vals, 1.0) == 5
    assert energy_dim(np.zeros(4), 0.9) == 1


def test_popularity_rule_follows_dlrm_md_solver():
    model = small_model(rows=(3, 40, 257, 1000), dim=8)
    prof = profile_of(model, {"t3": np.full(1000, 2)}, samples=1000)   # t3: k = 2 lookups/sample
    rw, report = apply(model, [passes.md(rule="popularity", max_error=10)], profile=prof)
    # dlrm md_solver(d0=8): λ = d0 · (n/k)_min^α, d = round(λ (n/k)^-α), clamped to >= 1
    lam = 8 * 3 ** 0.3
    assert rw.embeddings["t2"].inner_dim == round(lam * 257 ** -0.3) == 2
    assert rw.embeddings["t3"].inner_dim == round(lam * (1000 / 2) ** -0.3) == 2
    assert {t.table: t.status for t in report.tables}["t1"] == "skipped"   # 40 rows < min_rows
    unprofiled, _ = apply(model, [passes.md(rule="popularity", max_error=10)])   # k = 1
    assert unprofiled.embeddings["t3"].inner_dim == round(lam * 1000 ** -0.3) == 1


def test_popularity_budget_fits_and_is_used():
    model = small_model(rows=(3, 40, 2570, 10000), dim=8)
    budget = 120_000
    rw, _ = apply(model, [passes.md(rule="popularity", budget=str(budget), max_error=10)])
    used = sum(rw.embeddings[t].num_bytes() for t in ("t2", "t3"))
    assert used <= budget
    # raising either d_i by one would break the budget or the rule's order (d grows as n shrinks)
    d2, d3 = rw.embeddings["t2"].inner_dim, rw.embeddings["t3"].inner_dim
    assert d2 >= d3 and used + 4 * (10000 + 8) > budget


def test_budget_no_setting_meets():
    model = small_model(rows=(3, 40, 2570, 10000), dim=8)
    # d_i = 1 everywhere: 4 B × ((2570 + 8) + (10000 + 8)) = 50344 B
    with pytest.raises(RewriteError, match=r"pass md: budget 10kB \(10000 B\) is below the smallest md "
                                           r"form of the selected tables \(50344 B with d_i = 1\)"):
        apply(model, [parse_pass("md:rule=popularity:budget=10kB")])


def test_skip_reasons():
    g = torch.Generator().manual_seed(3)
    model = small_model(rows=(3, 200, 1000, 201), dim=64)
    u, _ = torch.linalg.qr(torch.randn(201, 64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    s = torch.cat([torch.ones(50), torch.full((14,), 1e-4)])
    model = with_table(model, "t3", u @ torch.diag(s) @ v.t())       # 99.9% energy needs 50 of 64 dims
    model = model.with_tables({"t2": TableBag(1000, 64, dtype="float16", weight=model.embeddings["t2"].weight)})
    _, report = apply(model, [passes.md(energy=0.999)])
    reasons = {t.table: t.reason for t in report.tables}
    assert reasons["t0"] == "3 rows < min_rows=201"
    assert reasons["t1"] == "200 rows < min_rows=201"
    assert reasons["t2"] == "md rewrites fp32 plain tables, this is table 1000x64 float16"
    assert reasons["t3"] == ("energy 0.999 gives d_i=50, whose md form (53000 B) is not smaller than "
                             "the table (51456 B)")
    _, full = apply(small_model(rows=(3, 40, 257, 1000)), [passes.md(energy=1.0, tables=("t3",))])
    assert full.tables[0].reason == "energy 1 keeps all 8 dimensions"


@pytest.mark.parametrize("spec,message", [
    ("md:energy=0", "energy must be in (0, 1], got 0.0"),
    ("md:energy=1.5", "energy must be in (0, 1], got 1.5"),
    ("md:alpha=2", "alpha must be in [0, 1], got 2.0"),
    ("md:max_error=0", "max_error must be > 0, got 0.0"),
    ("md:rule=svd", "option rule='svd': must be one of energy, popularity"),
    ("md:budget=1MB", "budget applies to rule=popularity (add rule=popularity)"),
    ("md:rule=popularity:budget=lots", "cannot read 'lots' as a byte size"),
    ("md:round_pow2=maybe", "option round_pow2='maybe': must be true or false"),
])
def test_config_validation(spec, message):
    error = spec_error(spec)
    assert message in error and error.startswith("pass md:")


def test_max_error_gate():
    model = small_model()
    _, report = apply(model, [passes.md(energy=0.5, max_error=0.01)])
    bad = [t for t in report.tables if t.status == "rewritten"]
    assert bad and not any(t.within_tolerance for t in bad) and not report.ok
    assert bad[0].tolerance == "relative error <= 0.01"


def test_mean_pooling_and_ragged_bags():
    w = low_rank(1000, 8, 2)
    rep = fit_md(w, np.ones(1000), 2, pooling="mean")
    ref = TableBag(1000, 8, "mean", weight=w)
    for b in batches(small_model(rows=(1000,)), n=2, mean_len=3.0):
        assert_close(rep(b.indices, b.offsets), ref(b.indices, b.offsets), "float32")


def test_round_trip_lint_and_export(tmp_path):
    model = small_model()
    rw, _ = apply(model, [passes.md(energy=0.8)])
    assert rw.embeddings["t3"].kind == "md"
    rewrite.save(rw, tmp_path / "md.safetensors")
    back = rewrite.load(tmp_path / "md.safetensors")
    for k, v in rw.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ex, check = batches(model, n=2, seed=9)
    assert torch.equal(back(*check.inputs()), rw(*check.inputs()))
    rewrite.capture(rw)[0].graph.lint()
    assert_exports(rw, ex, check)
