"""qr: weighted least-squares fits (mult by ALS, add, concat) against independent solvers;
per-row semantics, bytes, skips, validation, round trip, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import passes
import rewrite
from passes.quotient_remainder import QRBag, fit_qr
from rewrite.core.embedding import TableBag
from rewrite.pass_manager import apply
from tests.pass_helpers import assert_exports, batches, profile_of, small_model, spec_error
from tests.tolerances import assert_close

torch.set_num_threads(1)


def fitted(rep: QRBag, rows: int) -> np.ndarray:
    return rep.dense_rows(torch.arange(rows)).detach().numpy().astype(np.float64)


def weighted_loss(w: np.ndarray, weights: np.ndarray, approx: np.ndarray) -> float:
    return float((weights[:, None] * (w - approx) ** 2).sum())


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_exact_on_a_qr_structured_table(op):
    g = torch.Generator().manual_seed(0)
    c, rows, d = 4, 1001, 8
    part = d // 2 if op == "concat" else d
    wq, wr = torch.randn(-(-rows // c), part, generator=g), torch.randn(c, part, generator=g) + 2
    truth = QRBag(rows, d, c, op=op)
    truth.weight_q.data, truth.weight_r.data = wq, wr
    w = truth.dense_rows(torch.arange(rows)).detach()
    rep, _ = fit_qr(w, np.random.default_rng(1).pareto(1.0, rows) + 0.1, c, op)
    assert_close(fitted(rep, rows), w.numpy(), "qr-fit", f"{op}: a table of exact QR form")


def test_add_matches_a_least_squares_solver():
    g = torch.Generator().manual_seed(1)
    rows, c, d = 301, 4, 3
    w = torch.randn(rows, d, generator=g)
    weights = np.random.default_rng(2).pareto(1.0, rows) + 0.1
    rep, sweeps = fit_qr(w, weights, c, "add")
    # independent: the design matrix [one-hot(q) | one-hot(r)] solved by lstsq per column
    q, r = np.arange(rows) // c, np.arange(rows) % c
    design = np.zeros((rows, q.max() + 1 + c))
    design[np.arange(rows), q] = 1
    design[np.arange(rows), q.max() + 1 + r] = 1
    s = np.sqrt(weights)[:, None]
    coef, *_ = np.linalg.lstsq(s * design, s * w.numpy().astype(np.float64), rcond=None)
    ref = design @ coef
    best = weighted_loss(w.numpy(), weights, ref)
    assert weighted_loss(w.numpy(), weights, fitted(rep, rows)) <= best * (1 + 1e-4) + 1e-9
    assert sweeps > 1


def test_mult_matches_rank_one_svd_per_column():
    g = torch.Generator().manual_seed(3)
    rows, c, d = 400, 4, 5
    w = torch.randn(rows, d, generator=g)
    rep, _ = fit_qr(w, np.ones(rows), c, "mult")
    # uniform weights, rows divisible by c: column k is the matrix M_k[q, r] = W[q c + r, k], and
    # the best W_q[:, k] W_r[:, k]ᵀ is its leading singular pair (Eckart-Young)
    m = w.numpy().astype(np.float64).reshape(rows // c, c, d)
    ref = np.empty_like(m)
    for k in range(d):
        u, s, vt = np.linalg.svd(m[:, :, k])
        ref[:, :, k] = s[0] * np.outer(u[:, 0], vt[0])
    assert_close(fitted(rep, rows), ref.reshape(rows, d), "qr-fit", "mult vs per-column rank-1 SVD")


def test_concat_is_the_weighted_mean_of_each_half():
    g = torch.Generator().manual_seed(4)
    rows, c = 103, 4
    w = torch.randn(rows, 6, generator=g)
    weights = np.random.default_rng(5).random(rows) + 0.1
    rep, _ = fit_qr(w, weights, c, "concat")
    x = w.numpy().astype(np.float64)
    for q in range(-(-rows // c)):
        ids = np.arange(q * c, min(rows, (q + 1) * c))
        assert_close(rep.weight_q[q], np.average(x[ids, :3], axis=0, weights=weights[ids]), "weighted-mean-fit",
                     f"q {q}")
    for r in range(c):
        ids = np.arange(r, rows, c)
        assert_close(rep.weight_r[r], np.average(x[ids, 3:], axis=0, weights=weights[ids]), "weighted-mean-fit",
                     f"r {r}")


def test_frequency_weighting_favours_hot_rows():
    model = small_model()
    hot = np.zeros(1000, dtype=np.int64)
    hot[::37] = 500                                     # ~27 hot rows spread over the table
    prof = profile_of(model, {"t3": hot}, samples=1000)
    weighted, _ = apply(model, [passes.qr(tables=("t3",))], profile=prof)
    uniform, _ = apply(model, [passes.qr(tables=("t3",))])
    ids = torch.from_numpy(np.flatnonzero(hot))
    ref = model.embeddings["t3"].weight.detach()[ids]
    err = lambda m: float((m.embeddings["t3"].dense_rows(ids).detach() - ref).norm())  # noqa: E731
    assert err(weighted) < 0.5 * err(uniform)


def test_per_row_semantics_on_ragged_bags():
    model = small_model()
    rw, _ = apply(model, [passes.qr(op="add", tables=("t3",))])
    rep = rw.embeddings["t3"]
    assert not rep.pool_first
    rows = rep.dense_rows(torch.arange(1000)).detach()
    for b in batches(small_model(rows=(1000,)), n=2, mean_len=3.0):
        assert_close(rep(b.indices, b.offsets), TableBag(1000, 8, weight=rows)(b.indices, b.offsets), "float32")


def test_bytes_by_hand():
    model = small_model(rows=(3, 40, 257, 1000))
    rw, report = apply(model, [passes.qr(collisions=4), passes.qr(op="concat", collisions=8, tables=("t2",))])
    assert rw.embeddings["t3"].num_bytes() == 4 * (250 + 4) * 8
    assert rw.embeddings["t2"].num_bytes() == 4 * (65 + 4) * 8       # ceil(257 / 4) = 65
    _, concat = apply(model, [passes.qr(op="concat", collisions=8, tables=("t2",))])
    assert concat.tables[0].bytes_after == 4 * (33 + 8) * 4          # halves of width 4


def test_skip_reasons():
    model = small_model(rows=(200, 201, 1000, 1000))
    model = model.with_tables({"t3": TableBag(1000, 8, dtype="float16", weight=model.embeddings["t3"].weight)})
    _, report = apply(model, [passes.qr(collisions=200)])
    reasons = {t.table: t.reason for t in report.tables}
    assert reasons["t0"] == "200 rows < min_rows=201"
    assert reasons["t1"] == "the qr form with 200 collisions (6464 B) is not smaller than the table (6432 B)"
    assert reasons["t3"] == "qr rewrites fp32 plain tables, this is table 1000x8 float16"
    _, report = apply(small_model(dim=7), [passes.qr(op="concat", tables=("t3",))])
    assert report.tables[0].reason == "op=concat splits the dimension in halves; dim 7 is odd"


@pytest.mark.parametrize("spec,message", [
    ("qr:collisions=1", "pass qr: collisions must be >= 2, got 1"),
    ("qr:collisions=2.5", "pass qr: option collisions='2.5': must be a whole number"),
    ("qr:op=div", "pass qr: option op='div': must be one of mult, add, concat"),
    ("qr:max_error=-1", "pass qr: max_error must be > 0, got -1.0"),
])
def test_config_validation(spec, message):
    assert spec_error(spec) == message


def test_max_error_gate():
    _, report = apply(small_model(), [passes.qr(max_error=0.05)])
    done = [t for t in report.tables if t.status == "rewritten"]
    assert done and not report.ok and all(t.rel_error > 0.05 and not t.within_tolerance for t in done)


def test_round_trip_lint_and_export(tmp_path):
    model = small_model()
    rw, _ = apply(model, [passes.qr(tables=("t3",)), passes.qr(op="concat", tables=("t2",))])
    rewrite.save(rw, tmp_path / "qr.safetensors")
    back = rewrite.load(tmp_path / "qr.safetensors")
    assert back.embeddings["t3"].params() == rw.embeddings["t3"].params()
    for k, v in rw.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ex, check = batches(model, n=2, seed=11)
    assert torch.equal(back(*check.inputs()), rw(*check.inputs()))
    rewrite.capture(rw)[0].graph.lint()
    assert_exports(rw, ex, check)
