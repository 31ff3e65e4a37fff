"""AUC against a brute-force count over all (positive, negative) pairs, ties counting half;
log loss against the textbook formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewrite.core.metrics import auc, logloss


def brute_auc(y, s) -> float:
    pos = [si for yi, si in zip(y, s) if yi]
    neg = [si for yi, si in zip(y, s) if not yi]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_by_hand():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([1, 0], [0.5, 0.5]) == 0.5
    assert auc([0, 1, 1], [3.0, 2.0, 1.0]) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.random(n) < 0.3
    s = np.round(rng.normal(y * 0.7, 1.0), 1)          # rounding makes many ties, across classes too
    assert len(np.unique(s)) < n / 3
    assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_auc_is_rank_based_and_undefined_for_one_class():
    rng = np.random.default_rng(9)
    y, s = rng.random(200) < 0.5, rng.normal(size=200)
    assert auc(y, s) == pytest.approx(auc(y, 1 / (1 + np.exp(-3 * s))))
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))


def test_logloss_matches_formula():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, 500)
    y = (rng.random(500) < 0.4).astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    direct = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert logloss(y, z) == pytest.approx(direct, rel=1e-10)
    assert logloss([1, 0], [0.0, 0.0]) == pytest.approx(math.log(2))


def test_logloss_stable_for_extreme_logits():
    # log(1 - sigmoid(800)) overflows the direct formula; the softplus form gives 800 exactly
    assert logloss([0], [800.0]) == pytest.approx(800.0)
    assert logloss([1], [800.0]) == pytest.approx(0.0, abs=1e-300)
    assert logloss([1], [-800.0]) == pytest.approx(800.0)
