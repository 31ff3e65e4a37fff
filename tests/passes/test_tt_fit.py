"""passes.tt_fit: the row/dim factorisations against brute force, the rank limits by hand,
TT-SVD of a table built by the test from TT cores (exact TT rank) reconstructing it to fp32
precision, weighted_error against the formula, and ALS never increasing the weighted error and
beating TT-SVD on a weighted problem."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from passes import tt_fit
from passes.tensor_train import TTBag
from tests.tolerances import assert_close, tolerance


def tt_table(cores: list[torch.Tensor], rows: int) -> torch.Tensor:
    """W[i, j] = G_1[i_1][:, j_1, :] G_2[i_2][:, j_2, :] ... (1x1), digits row-major, by loops."""
    p, q = [c.shape[0] for c in cores], [c.shape[2] for c in cores]
    w = torch.zeros(rows, math.prod(q), dtype=torch.float64)
    for i in range(rows):
        row_digits = np.unravel_index(i, p)
        for j in range(math.prod(q)):
            m = torch.ones(1, 1, dtype=torch.float64)
            for g, a, b in zip(cores, row_digits, np.unravel_index(j, q)):
                m = m @ g[a, :, b, :].double()
            w[i, j] = m[0, 0]
    return w


def random_cores(p, q, ranks, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in tt_fit.core_shapes(p, q, ranks)]


@pytest.mark.parametrize("rows", [1, 2, 7, 37, 100, 999, 1000, 4097])
def test_factor_rows_covers_with_the_least_sum(rows):
    p = tt_fit.factor_rows(rows)
    assert len(p) == 3 and math.prod(p) >= rows and p[1] == min(p)
    # brute force: every (a, b) and the least c covering the rest
    best = min((a + b + math.ceil(rows / (a * b)), a * b * math.ceil(rows / (a * b)))
               for a in range(1, rows + 1) for b in range(1, rows // a + 2))
    assert (sum(p), math.prod(p)) == best
    for k in (2, 4):
        assert len(tt_fit.factor_rows(rows, k)) == k and math.prod(tt_fit.factor_rows(rows, k)) >= rows


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 8, 12, 16, 64, 100, 128])
def test_factor_dim_multiplies_to_dim_most_balanced(dim):
    q = tt_fit.factor_dim(dim)
    assert len(q) == 3 and math.prod(q) == dim and q[1] == min(q)
    divisors = [a for a in range(1, dim + 1) if dim % a == 0]
    spread = min(max(t) - min(t) for t in itertools.product(divisors, repeat=3) if math.prod(t) == dim)
    assert max(q) - min(q) == spread
    assert math.prod(tt_fit.factor_dim(dim, 2)) == dim


def test_max_ranks_and_valid_ranks_by_hand():
    # p q per core: 20, 20, 40 -> r_1 = min(20, 800), r_2 = min(400, 40)
    assert tt_fit.max_ranks((10, 10, 10), (2, 2, 4)) == (20, 40)
    assert tt_fit.max_ranks((2, 3), (4, 1)) == (3,)
    assert tt_fit.valid_ranks((10, 10, 10), (2, 2, 4), (100, 100)) == (20, 40)      # clipped
    assert tt_fit.valid_ranks((10, 10, 10), (2, 2, 4), (0, 5)) == (1, 5)            # at least 1
    # 4 cores of p q = 2: max (2, 4, 2); r_2 <= r_1 * 2 = 2 once r_1 = 1
    assert tt_fit.valid_ranks((2, 2, 2, 2), (1, 1, 1, 1), (1, 4, 1)) == (1, 2, 1)


P, Q, RANKS = (4, 3, 5), (2, 2, 2), (2, 3)     # a 60 x 8 table of TT rank (2, 3)


def test_tt_svd_of_an_exact_tt_table_reconstructs_it():
    w = tt_table(random_cores(P, Q, RANKS), 60)
    for cores in (tt_fit.tt_svd(w, P, Q, RANKS), tt_fit.tt_svd(w, P, Q, eps=1e-6)):
        assert [c.shape for c in cores] == [torch.Size(s) for s in tt_fit.core_shapes(P, Q, RANKS)]
        assert_close(tt_table(cores, 60), w, "tt-exact", "TT-SVD product (float64)")
        rep = TTBag.from_cores(cores, 60, 8)                                     # fp32 cores
        assert_close(rep.dense_rows(torch.arange(60)).detach(), w, "tt-exact", "TTBag rows (fp32)")


def test_tt_svd_at_max_ranks_is_exact_with_padding_rows():
    w = torch.randn(55, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cores = tt_fit.tt_svd(w, P, Q, tt_fit.max_ranks(P, Q))                     # 55 rows padded to 60
    assert_close(tt_table(cores, 55), w, "tt-exact", "full-rank TT-SVD")


def test_weighted_error_is_the_formula():
    w = torch.randn(55, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = torch.rand(55, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cores = random_cores(P, Q, RANKS, seed=4)
    t = tt_table(cores, 55)
    want = torch.sqrt((weights * ((w - t) ** 2).sum(1)).sum() / (weights * (w ** 2).sum(1)).sum())
    assert_close(torch.tensor(tt_fit.weighted_error(w, weights, cores), dtype=torch.float64), want,
                 "float32", "weighted_error")


@pytest.mark.parametrize("rows", [60, 55])                 # 55: 5 zero-weight padding rows
def test_als_never_increases_the_weighted_error_and_beats_tt_svd(rows):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(rows, 8, generator=g, dtype=torch.float64)
    weights = (torch.arange(rows, dtype=torch.float64) + 1) ** -1.5                 # Zipf-like
    weights = weights[torch.randperm(rows, generator=g)]
    svd = tt_fit.tt_svd(w, P, Q, (2, 2))
    errs = [tt_fit.weighted_error(w, weights, tt_fit.als(w, weights, svd, s)) for s in range(4)]
    assert errs[0] == tt_fit.weighted_error(w, weights, svd)                       # 0 sweeps: unchanged
    slack = 1 + tolerance("als-monotone").rtol
    assert all(b <= a * slack for a, b in zip(errs, errs[1:])), errs
    assert errs[1] < errs[0] and errs[3] < errs[0], errs
