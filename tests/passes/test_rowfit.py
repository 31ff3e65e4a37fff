"""passes.rowfit: the byte budget, the weighted rms and relative error against hand-computed
values, ``fit_rows`` reducing the weighted error of a tiny low-rank fit (full-batch and sampled,
and favouring the heavy rows), the option refusals with their messages, and the shared skips."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import passes
from passes.rowfit import (DEFAULT_COMPRESSION, FIT_EPOCHS, MAX_STEPS, MIN_STEPS, FitOptions, auto_steps,
                           budget_bytes, check_fit_options, fit_rows, fit_steps, not_smaller, rms, table_rows,
                           target_compression, weighted_rel_error)
from rewrite.core.embedding import TableBag
from rewrite.core.pass_contract import Skip
from rewrite.pass_manager import apply
from tests.pass_helpers import small_model
from tests.tolerances import assert_close


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_budget_bytes_is_fp32_bytes_over_compression():
    assert budget_bytes(1000, 16, 4) == 16_000                # 1000 * 16 * 4 B / 4
    assert budget_bytes(1000, 16, 3) == 21_333                # 64000 / 3, rounded down
    assert budget_bytes(10, 3, 1) == 120


def test_rms_and_weighted_rel_error_by_hand():
    target = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    w = torch.tensor([1.0, 3.0])
    # (1 * 25 + 3 * 4) / (4 weight * 2 columns)
    assert_close(scalar(rms(target, w)), scalar(math.sqrt(37 / 8)), "float32", "rms")
    assert rms(torch.zeros(3, 2), torch.ones(3)) == 1.0
    pred = torch.tensor([[3.0, 3.0], [0.0, 0.0]])
    # sqrt((1 * 1 + 3 * 4) / (1 * 25 + 3 * 4))
    assert_close(scalar(weighted_rel_error(pred, target, w)), scalar(math.sqrt(13 / 37)), "float32", "rel error")
    # a zero target: the absolute error sqrt(Σ w ||pred||²)
    assert_close(scalar(weighted_rel_error(pred, torch.zeros(2, 2), w)), scalar(math.sqrt(18)), "float32",
                 "rel error of a zero target")


def low_rank_problem(rows: int = 64, dim: int = 8, rank: int = 2, model_rank: int = 2):
    """A rank-``rank`` target and a rank-``model_rank`` factorisation U V to fit to it."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(rows, rank, generator=g) @ torch.randn(rank, dim, generator=g)
    u = torch.nn.Parameter(0.1 * torch.randn(rows, model_rank, generator=g))
    v = torch.nn.Parameter(0.1 * torch.randn(model_rank, dim, generator=g))
    return target, u, v, (lambda ids: u[ids] @ v)


@pytest.mark.parametrize("batch_size", [64, 16])            # full-batch, then sampled by weight
def test_fit_rows_reduces_the_weighted_error(batch_size):
    target, u, v, rows_of = low_rank_problem()
    weights = np.random.default_rng(1).random(64) + 0.1
    w = torch.from_numpy(weights).float()
    with torch.no_grad():
        before = weighted_rel_error(rows_of(torch.arange(64)), target, w)
    loss = fit_rows(rows_of, [u, v], target, weights, steps=400, batch_size=batch_size, lr=3e-2, seed=0,
                    desc="test")
    with torch.no_grad():
        after = weighted_rel_error(rows_of(torch.arange(64)), target, w)
    assert before > 0.9 and after < 0.05 * before, (before, after)     # representable: the fit finds it
    assert math.isfinite(loss)


def test_fit_rows_favours_heavy_rows():
    """Rank 2 cannot fit a rank-6 table, but can fit any 2 of its rows: weighting rows 0 and 1
    (1000x, full-batch and sampled) buys them a far smaller error than the uniform fit gives them."""
    errors = {}
    for name, heavy, batch_size in (("uniform", 1.0, 64), ("weighted", 1000.0, 64), ("sampled", 1000.0, 16)):
        target, u, v, rows_of = low_rank_problem(rank=6, model_rank=2)
        weights = np.ones(64)
        weights[:2] = heavy
        fit_rows(rows_of, [u, v], target, weights, steps=400, batch_size=batch_size, lr=3e-2, seed=0,
                 desc="test")
        with torch.no_grad():
            errors[name] = weighted_rel_error(rows_of(torch.arange(2)), target[:2], torch.ones(2))
    assert max(errors["weighted"], errors["sampled"]) < 0.2 * errors["uniform"], errors


def test_fit_rows_with_no_steps_fits_nothing():
    target, u, v, rows_of = low_rank_problem()
    u0 = u.detach().clone()
    assert math.isnan(fit_rows(rows_of, [u, v], target, np.ones(64), 0, 64, 1e-2, 0, "test"))
    assert torch.equal(u.detach(), u0)


def test_table_rows_reads_every_row_in_chunks():
    w = torch.randn(10, 3)
    assert_close(table_rows(TableBag(10, 3, weight=w), 10, chunk=3), w, "exact", "rows of a plain table")


@dataclass(frozen=True)
class Fitted(FitOptions):           # as dhe / memrec / hybrid use it: with their own compression
    compression: float | None = None


def test_fit_options_defaults():
    cfg = Fitted()
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.max_error, cfg.seed) == (None, 2048, 3e-3, 0.9, 0)


def test_fit_options_alone_are_the_documented_defaults():
    opts = FitOptions()
    assert (opts.steps, opts.batch_size, opts.lr, opts.max_error, opts.seed) == (None, 2048, 3e-3, 0.9, 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"compression": 0.5}, "compression must be >= 1, got 0.5"),
    ({"compression": float("nan")}, "compression must be >= 1, got nan"),
    ({"steps": -1}, "steps must be >= 0 and batch_size >= 1"),
    ({"batch_size": 0}, "steps must be >= 0 and batch_size >= 1"),
    ({"lr": 0.0}, "lr must be > 0, got 0.0"),
    ({"max_error": -0.1}, "max_error must be >= 0, got -0.1"),
])
def test_refusals_name_the_value(kwargs, message):
    with pytest.raises(ValueError) as e:
        Fitted(**kwargs)
    assert str(e.value) == message
    ok = {"compression": None, "max_error": None, "steps": 0, "batch_size": 1, "lr": 1.0}
    with pytest.raises(ValueError) as e:                     # the plain function, on any object
        check_fit_options(SimpleNamespace(**{**ok, **kwargs}))
    assert str(e.value) == message
    check_fit_options(SimpleNamespace(**ok))


def test_auto_steps_scale_with_rows_between_the_floor_and_the_cap():
    assert auto_steps(2, 2048) == auto_steps(2048, 2048) == MIN_STEPS          # full-batch tables
    assert auto_steps(10_000_000, 2048) == MAX_STEPS
    rows = 200_000                                                              # in between: 6 passes
    assert auto_steps(rows, 2048) == math.ceil(FIT_EPOCHS * rows / 2048)
    assert fit_steps(Fitted(steps=7), 10) == 7 and fit_steps(Fitted(), 10) == MIN_STEPS


def test_target_compression_defaults_unless_a_shape_is_given():
    assert target_compression(Fitted(), shape_given=False) == DEFAULT_COMPRESSION
    assert target_compression(Fitted(), shape_given=True) is None
    assert target_compression(Fitted(compression=3), shape_given=False) == 3.0


def test_not_smaller_skips_at_the_tables_bytes():
    table = TableBag(10, 4, weight=torch.zeros(10, 4))          # 160 bytes
    assert not_smaller("dhe", 160, table) == Skip("dhe would take 160 bytes, not fewer than the table's 160")
    assert not_smaller("dhe", 159, table) is None


def test_fitted_pass_skips():
    model = small_model(rows=(1, 40))
    model = model.with_tables({"t1": TableBag(40, 8, dtype="float16", weight=model.embeddings["t1"].weight)})
    _, report = apply(model, [passes.dhe(steps=0)])
    assert [t.reason for t in report.tables] == [
        "dhe needs at least 2 rows, the table has 1", "dhe fits fp32 plain tables, this is table 40x8 float16"]
    _, report = apply(small_model(rows=(40,)), [passes.dhe(k=1024, steps=0)])    # 1024 hashes + MLP: far larger
    dhe_bytes = int(report.tables[0].reason.split()[3])
    assert report.tables[0].reason == f"dhe would take {dhe_bytes} bytes, not fewer than the table's 1280"
    assert dhe_bytes >= 1280
