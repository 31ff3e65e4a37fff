"""tt: lookups against torch's embedding_bag over the ORIGINAL fp32 table.  A table of exactly
the fitted TT rank comes back to fp32 precision; a lossy fit stays within the bound its reported
weighted error implies (module doc of ``check_bags``), and that reported error is the error of
the representation's own lookups.  Plus factorisations, ALS, bytes, the cache, int8 cores, skips,
option refusals, round trip and export."""

import math

import numpy as np
import pytest
import torch

import passes
import rewrite
from passes import tt_fit
from passes.tensor_train import TTBag, rowwise_int8
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.pass_contract import parse_pass
from rewrite.core.tracing import capture
from tests.helpers import (assert_exports, assert_roundtrip, ragged_batches, reference_bags, table_bags)
from tests.tolerances import assert_close, tolerance


def fit_weights(profile, table: str, rows: int, cached=()) -> torch.Tensor:
    """The weights the pass fits with (access counts + 1, up to scale; cached rows 0)."""
    c = profile.counts(table).astype(np.float64) + 1 if profile is not None else np.ones(rows)
    c[np.asarray(cached, dtype=np.int64)] = 0.0
    return torch.from_numpy(c)


def check_reported_error(rep, original: torch.Tensor, weights: torch.Tensor, reported: float) -> None:
    """Every row as a one-id bag against the original rows: sqrt(Σ w ||Δ||² / Σ w ||W||²) is the
    error the fit reported."""
    ids = torch.arange(rep.rows)
    with torch.no_grad():
        delta = rep(ids, torch.arange(rep.rows + 1)).double() - reference_bags(original, ids, torch.arange(rep.rows + 1))
    measured = torch.sqrt((weights * (delta ** 2).sum(1)).sum() / (weights * (original.double() ** 2).sum(1)).sum())
    assert_close(measured, torch.tensor(reported, dtype=torch.float64), "fit-error-report", "reported error")


def check_bags(model, rewritten, table: str, weights: torch.Tensor, reported: float) -> None:
    """Rewritten bags vs embedding_bag over the ORIGINAL table on ragged / empty / largest-id bags.

    The report says Σ_i w_i ||T_i − W_i||² = err² S, S = Σ_i w_i ||W_i||², so a row with w_i > 0
    has ||T_i − W_i|| <= err sqrt(S / w_i) (rows with w_i = 0 are cached: exact), and a bag's
    ||Δ|| is at most the sum of its rows' bounds (triangle inequality), plus fp32 rounding."""
    original = model.embeddings[table].weight.detach()
    s = (weights * (original.double() ** 2).sum(1)).sum()
    row_bound = torch.where(weights > 0, reported * torch.sqrt(s / weights.clamp(min=1e-300)), 0.0)
    tol = tolerance("float32")
    for batch in ragged_batches(model):
        idx, off = table_bags(batch, model, table)
        assert int(idx.max()) == model.embeddings[table].rows - 1 and bool((off[1:] == off[:-1]).any())
        with torch.no_grad():
            delta = rewritten.embeddings[table](idx, off).double() - reference_bags(original, idx, off)
        bound = reference_bags(row_bound[:, None], idx, off)[:, 0]
        excess = delta.norm(dim=1) - (bound + tol.atol + tol.rtol * bound)
        assert (excess <= 0).all(), f"{table}: a bag exceeds its bound by {float(excess.max()):.3g}"


def exact_tt_table(p, q, ranks, seed=0) -> torch.Tensor:
    """W[i, j] = Σ G_1[i_1, j_1, s] G_2[i_2, s, j_2, t] G_3[i_3, t, j_3]: TT rank ``ranks`` exactly."""
    g = torch.Generator().manual_seed(seed)
    g1, g2, g3 = (0.5 * torch.randn(shape, generator=g) for shape in tt_fit.core_shapes(p, q, ranks))
    w = torch.einsum("xas,ysbt,ztc->xyzabc", g1[:, 0], g2, g3[..., 0])
    return w.reshape(math.prod(p), math.prod(q)).contiguous()


def test_factorizations_are_balanced_and_cover():
    assert tt_fit.factor_rows(1000) == (10, 10, 10)
    assert tt_fit.factor_rows(20000) == (25, 25, 32)
    assert tt_fit.factor_dim(16) == (2, 2, 4)
    assert tt_fit.factor_dim(64) == (4, 4, 4)
    for rows in (1, 2, 37, 999, 10_131_227):
        p = tt_fit.factor_rows(rows)
        assert math.prod(p) >= rows and math.prod(p) < rows * 1.2 + 8 and max(p) <= 2 * min(p) + 4
    assert tt_fit.max_ranks((10, 10, 10), (2, 2, 4)) == (20, 40)


def test_exact_tt_rank_table_comes_back_to_fp32_precision(model, profile):
    w = exact_tt_table((10, 10, 10), (2, 2, 4), (2, 3))
    exact = model.with_tables({"t0": TableBag(1000, 16, weight=w)})
    rw, report = rewrite.apply(exact, [passes.tt(rank=(2, 3), tables=("t0",))], profile=profile)
    rep = rw.embeddings["t0"]
    assert rep.ranks == (2, 3) and report.tables[0].notes["weighted_error_als"] < tolerance("tt-exact").rtol
    for batch in ragged_batches(exact):
        idx, off = table_bags(batch, exact, "t0")
        with torch.no_grad():
            assert_close(rep(idx, off), reference_bags(w, idx, off), "tt-exact", "tt bags vs the original table")


def test_als_reduces_weighted_error_at_equal_ranks(model, profile):
    w = model.embeddings["t0"].weight.detach()
    p, q = tt_fit.factor_rows(1000), tt_fit.factor_dim(16)
    weights = torch.from_numpy(profile.counts("t0").astype(np.float64) + 1)
    for ranks in ((2, 2), (4, 8), (8, 8)):
        svd = tt_fit.tt_svd(w, p, q, ranks)
        errs = [tt_fit.weighted_error(w, weights, tt_fit.als(w, weights, svd, s)) for s in (0, 1, 2)]
        assert errs[0] == tt_fit.weighted_error(w, weights, svd)
        assert errs[1] < 0.9 * errs[0] and errs[2] <= errs[1] * (1 + tolerance("als-monotone").rtol), (ranks, errs)


def test_pass_numerics_bytes_and_notes(model, profile):
    rw, report = rewrite.apply(model, [passes.tt(rank=(4,), tables=("t0",))], profile=profile)
    rep = rw.embeddings["t0"]
    assert isinstance(rep, TTBag) and rep.ranks == (4, 4) and rep.p == (10, 10, 10)
    weights = fit_weights(profile, "t0", 1000)
    check_bags(model, rw, "t0", weights, report.tables[0].notes["weighted_error_als"])
    check_reported_error(rep, model.embeddings["t0"].weight.detach(), weights,
                         report.tables[0].notes["weighted_error_als"])
    assert rep.num_bytes() == 4 * (10 * 1 * 2 * 4 + 10 * 4 * 2 * 4 + 10 * 4 * 4 * 1) == 2240
    t = report.tables[0]
    assert t.status == "rewritten" and t.bytes_after == 2240
    assert t.notes["weighted_error_als"] < t.notes["weighted_error_tt_svd"]
    capture(rw)[0].graph.lint()


@pytest.mark.parametrize("index", ["map", "sorted"])
def test_cache_rows_exact_and_bytes(model, profile, index):
    cp = passes.tt(rank=(4,), cache_rows=50, cache_index=index, tables=("t0",))
    rw, report = rewrite.apply(model, [cp], profile=profile)
    rep, w = rw.embeddings["t0"], model.embeddings["t0"].weight.detach()
    counts = profile.counts("t0")
    hot = np.lexsort((np.arange(1000), -counts))[:50]
    got = rep.dense_rows(torch.from_numpy(hot))
    assert torch.equal(got, w[torch.from_numpy(hot)])           # cached rows are served exactly
    index_bytes = 1000 * 2 if index == "map" else 64 * 4       # int16 slot map / 2^6 sorted int32 ids
    assert rep.num_bytes() == 2240 + 50 * 16 * 4 + index_bytes
    assert report.tables[0].notes["cache_lookup_share"] == counts[hot].sum() / counts.sum()
    weights = fit_weights(profile, "t0", 1000, cached=hot)     # the error of the rows not cached
    check_bags(model, rw, "t0", weights, report.tables[0].notes["weighted_error_als"])
    check_reported_error(rep, w, weights, report.tables[0].notes["weighted_error_als"])


def test_cache_coverage_and_auto_index(model, profile):
    rw, report = rewrite.apply(model, [passes.tt(rank=(4,), cache_coverage=0.5, tables=("t0",))],
                               profile=profile)
    notes = report.tables[0].notes
    assert notes["cache_lookup_share"] >= 0.5 and notes["cache_index"] == "sorted"
    k = notes["cache_rows"]
    assert rewrite.apply(model, [passes.tt(rank=(4,), cache_rows=k - 1, tables=("t0",))],
                         profile=profile)[1].tables[0].notes["cache_lookup_share"] < 0.5


def test_int8_cores_bytes_and_error_bound(model, profile):
    rw, report = rewrite.apply(model, [passes.tt(rank=(4,), core_bits=8, tables=("t0",))], profile=profile)
    rep = rw.embeddings["t0"]
    assert rep.num_bytes() == 10 * (8 + 8) + 10 * (32 + 8) + 10 * (16 + 8)
    x = torch.randn(7, 32)
    codes, sb = rowwise_int8(x)
    assert codes.dtype == torch.uint8
    # |error| <= scale / 2 per element, plus the fp32 rounding of codes * scale + bias
    assert ((codes.float() * sb[:, :1] + sb[:, 1:]) - x).abs().max() <= sb[:, 0].max() / 2 + tolerance("float32").atol
    assert torch.equal(rowwise_int8(torch.ones(2, 3))[0], torch.zeros(2, 3, dtype=torch.uint8))
    err = report.tables[0].notes["weighted_error_quantized"]
    assert err < 1.0
    weights = fit_weights(profile, "t0", 1000)
    check_bags(model, rw, "t0", weights, err)
    check_reported_error(rep, model.embeddings["t0"].weight.detach(), weights, err)


def test_compression_picks_largest_rank_within_budget(model, profile):
    rw, report = rewrite.apply(model, [passes.tt(compression=10, tables=("t0",))], profile=profile)
    rep = rw.embeddings["t0"]
    assert 64000 / rep.num_bytes() >= 10
    bigger = tt_fit.valid_ranks(rep.p, rep.q, tuple(r + 1 for r in rep.ranks))
    assert 4 * sum(a * b * c * d for a, b, c, d in tt_fit.core_shapes(rep.p, rep.q, bigger)) > 6400


def test_max_error_without_profile_meets_tolerance(model):
    rw, report = rewrite.apply(model, [passes.tt(max_error=0.5, tables=("t0",))])
    rep, w = rw.embeddings["t0"], model.embeddings["t0"].weight.detach()
    check_reported_error(rep, w, fit_weights(None, "t0", 1000), report.tables[0].notes["weighted_error_als"])
    assert report.tables[0].notes["weighted_error_als"] <= 0.5 and report.tables[0].within_tolerance


def test_roundtrip_export_and_lint(model, profile, tmp_path):
    cps = [passes.tt(rank=(4,), cache_rows=40, tables=("t0",)),
           passes.tt(rank=(3,), core_bits=8, cache_rows=20, cache_index="sorted", tables=("t1",))]
    rw, _ = rewrite.apply(model, cps, profile=profile)
    batch = ragged_batches(model, n=1)[0]
    loaded = assert_roundtrip(rw, tmp_path, batch)
    assert loaded.embeddings["t1"].describe() == rw.embeddings["t1"].describe()
    capture(loaded)[0].graph.lint()
    assert_exports(rw, batch)


def test_skip_reasons(model, profile):
    half = model.with_tables({"t2": TableBag(37, 16, dtype="float16",
                                             weight=model.embeddings["t2"].weight.detach())})
    cases = [
        (half, passes.tt(tables=("t2",)), None, "tt rewrites fp32 plain tables, this is table 37x16 float16"),
        (model, passes.tt(p=(2, 2, 2), tables=("t0",)), None, "p=2,2,2 covers 8 rows < the table's 1000"),
        (model, passes.tt(q=(2, 2, 2), tables=("t0",)), None, "q=2,2,2 multiplies to 8, not the table's dim 16"),
        (model, passes.tt(cache_rows=5, tables=("t0",)), None,
         "cache_rows / cache_coverage need an access profile (rewrite profile -o)"),
        (model, passes.tt(compression=500, tables=("t0",)), profile,
         "compression=500 leaves 128 bytes for the cores; rank 1 takes 320"),
        (model, passes.tt(tables=("t2",)), profile, "tt at ranks (8, 16) takes 3584 bytes >= the table's 2368"),
    ]
    for m, cp, prof, reason in cases:
        t = rewrite.apply(m, [cp], profile=prof)[1].tables[0]
        assert (t.status, t.reason) == ("skipped", reason)


@pytest.mark.parametrize("text, message", [
    ("tt:rank=4:compression=8", "give at most one of rank, compression, max_error (got rank, compression)"),
    ("tt:rank=0", "rank entries must be >= 1"),
    ("tt:compression=1", "compression must be > 1 (table bytes / tt bytes), got 1.0"),
    ("tt:max_error=1.5", "max_error must be in (0, 1), got 1.5"),
    ("tt:p=10,10:q=2,2,4", "p and q need the same number of factors (got 2 and 3)"),
    ("tt:p=1000", "p and q need at least 2 factors"),
    ("tt:p=0,10,10", "p and q factors must be >= 1"),
    ("tt:rank=4,4,4", "rank takes 1 or 2 values for 3 cores, got 3"),
    ("tt:sweeps=-1", "sweeps and cache_rows must be >= 0"),
    ("tt:cache_coverage=0", "cache_coverage must be in (0, 1], got 0.0"),
    ("tt:cache_rows=5:cache_coverage=0.5", "give cache_rows or cache_coverage, not both"),
    ("tt:core_bits=4", "option core_bits='4': must be one of 32, 8"),
    ("tt:cache_index=tree", "option cache_index='tree': must be one of auto, map, sorted"),
])
def test_config_errors(text, message):
    with pytest.raises(RewriteError) as e:
        parse_pass(text)
    assert str(e.value) == f"pass tt: {message}"


def test_grammar_round_trip():
    cp = parse_pass("tt:rank=8,16:cache_coverage=0.5:core_bits=8")
    assert cp.config.rank == (8, 16) and cp.config.core_bits == 8
    assert parse_pass(str(cp)) == cp
