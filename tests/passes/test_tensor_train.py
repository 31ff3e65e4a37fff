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

def dense_table(rep: TTBag) -> torch.Tensor:
    return rep.dense_rows(torch.arange(rep.rows))


def check_bags(model, rewritten, table, want_weight, atol):
    """Rewritten table vs EmbeddingBag over ``want_weight`` on ragged / empty / largest-id bags."""
    for batch in ragged_batches(model):
        idx, off = table_bags(batch, model, table)
        assert int(idx.max()) == model.embeddings[table].rows - 1 and bool((off[1:] == off[:-1]).any())
        got = rewritten.embeddings[table](idx, off).double()
        torch.testing.assert_close(got, reference_bags(want_weight, idx, off), rtol=0, atol=atol)


def test_factorizations_are_balanced_and_cover():
    assert tt_fit.factor_rows(1000) == (10, 10, 10)
    assert tt_fit.factor_rows(20000) == (25, 25, 32)
    assert tt_fit.factor_dim(16) == (2, 2, 4)
    assert tt_fit.factor_dim(64) == (4, 4, 4)
    for rows in (1, 2, 37, 999, 10_131_227):
        p = tt_fit.factor_rows(rows)
        assert math.prod(p) >= rows and math.prod(p) < rows * 1.2 + 8 and max(p) <= 2 * min(p) + 4
    assert tt_fit.max_ranks((10, 10, 10), (2, 2, 4)) == (20, 40)


def test_full_rank_reproduces_table_to_fp32_roundoff(model, profile):
    w = model.embeddings["t0"].weight.detach()
    p, q = tt_fit.factor_rows(1000), tt_fit.factor_dim(16)
    weights = torch.from_numpy(profile.counts("t0").astype(np.float64) + 1)
    for sweeps in (0, 2):
        cores = tt_fit.als(w, weights, tt_fit.tt_svd(w, p, q, tt_fit.max_ranks(p, q)), sweeps)
        rep = TTBag.from_cores(cores, 1000, 16)
        assert (dense_table(rep) - w).abs().max() <= 1e-6 * w.abs().max() * 16
        full = model.with_tables({"t0": rep})
        check_bags(model, full, "t0", w, atol=1e-6)


def test_als_reduces_weighted_error_at_equal_ranks(model, profile):
    w = model.embeddings["t0"].weight.detach()
    p, q = tt_fit.factor_rows(1000), tt_fit.factor_dim(16)
    weights = torch.from_numpy(profile.counts("t0").astype(np.float64) + 1)
    for ranks in ((2, 2), (4, 8), (8, 8)):
        svd = tt_fit.tt_svd(w, p, q, ranks)
        errs = [tt_fit.weighted_error(w, weights, tt_fit.als(w, weights, svd, s)) for s in (0, 1, 2)]
        assert errs[0] == tt_fit.weighted_error(w, weights, svd)
        assert errs[1] < 0.9 * errs[0] and errs[2] <= errs[1] * (1 + 1e-9), (ranks, errs)


def test_pass_numerics_bytes_and_notes(model, profile):
    rw, report = rewrite.apply(model, [passes.tt(rank=(4,), tables=("t0",))], profile=profile)
    rep = rw.embeddings["t0"]
    assert isinstance(rep, TTBag) and rep.ranks == (4, 4) and rep.p == (10, 10, 10)
    check_bags(model, rw, "t0", dense_table(rep).detach(), atol=1e-5)
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
    cold = torch.from_numpy(np.setdiff1d(np.arange(1000), hot))
    torch.testing.assert_close(rep.dense_rows(cold), rep.tt_rows(cold), rtol=0, atol=0)
    index_bytes = 1000 * 2 if index == "map" else 64 * 4       # int16 slot map / 2^6 sorted int32 ids
    assert rep.num_bytes() == 2240 + 50 * 16 * 4 + index_bytes
    assert report.tables[0].notes["cache_lookup_share"] == pytest.approx(counts[hot].sum() / counts.sum())
    check_bags(model, rw, "t0", dense_table(rep).detach(), atol=1e-5)


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
    assert ((codes.float() * sb[:, :1] + sb[:, 1:]) - x).abs().max() <= sb[:, 0].max() / 2 + 1e-6
    assert torch.equal(rowwise_int8(torch.ones(2, 3))[0], torch.zeros(2, 3, dtype=torch.uint8))
    check_bags(model, rw, "t0", dense_table(rep).detach(), atol=1e-5)
    assert report.tables[0].notes["weighted_error_quantized"] < 1.0


def test_compression_picks_largest_rank_within_budget(model, profile):
    rw, report = rewrite.apply(model, [passes.tt(compression=10, tables=("t0",))], profile=profile)
    rep = rw.embeddings["t0"]
    assert 64000 / rep.num_bytes() >= 10
    bigger = tt_fit.valid_ranks(rep.p, rep.q, tuple(r + 1 for r in rep.ranks))
    assert 4 * sum(a * b * c * d for a, b, c, d in tt_fit.core_shapes(rep.p, rep.q, bigger)) > 6400


def test_max_error_without_profile_meets_tolerance(model):
    rw, report = rewrite.apply(model, [passes.tt(max_error=0.5, tables=("t0",))])
    rep, w = rw.embeddings["t0"], model.embeddings["t0"].weight.detach()
    err = float(torch.linalg.norm(dense_table(rep).detach() - w) / torch.linalg.norm(w))
    assert err <= 0.5 and report.tables[0].within_tolerance


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
