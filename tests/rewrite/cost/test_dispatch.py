"""The dispatch policy: extra paths, crossings, the memory rule, the latency-target split."""

import pytest

from rewrite.cost.dispatch import design_dispatch, max_batch_within
from rewrite.dispatch import route
from rewrite.cost.estimate import DenseFacts, Estimator, TableStats
from rewrite.cost.select import select
from rewrite.cost.ilp import Constraints, Problem
from tests.rewrite.cost.conftest import synthetic_hw
from tests.rewrite.cost.test_ilp import variant


def problem():
    """keep: 2 calls, rows from DRAM (fast for small batches); 'gemmish': 60 calls, a 4 KB
    tensor that lives in cache (fast for large batches)."""
    vs = {"t0": [variant("t0", None, 400_000, 2), variant("t0", "gemmish", 4_000, 60, rows_bytes=16)]}
    return Problem(vs, Estimator(synthetic_hw()), {"t0": TableStats()}, DenseFacts((), 0.0, 0), 0)


def test_two_paths_switch_where_their_latencies_cross():
    p = problem()
    sel = select(p, Constraints(), 512)
    assert sel.solution.choice["t0"].pass_spec is None        # keep wins at 512
    paths, policy = design_dispatch(p, sel)
    assert [paths[n]["t0"].pass_spec for n in ("p0", "p1")] == [None, "gemmish"]
    keep, gem = p.variants["t0"]
    cross = next(b for b in range(1, 16385)
                 if p.variant_cost(gem, b).total < p.variant_cost(keep, b).total)
    assert policy["ranges"] == [{"min_batch": 1, "max_batch": cross - 1, "path": "p0"},
                                {"min_batch": cross, "max_batch": None, "path": "p1"}]
    assert route(policy["ranges"], cross - 1) == "p0" and route(policy["ranges"], 10**6) == "p1"
    assert policy["resident_bytes"] == 404_000 and policy["source"] == "estimated"


def test_no_extra_path_when_all_paths_would_not_fit_the_budget():
    p = problem()
    sel = select(p, Constraints(memory_budget=403_999), 512)
    paths, policy = design_dispatch(p, sel)
    assert list(paths) == ["p0"]
    assert policy["ranges"] == [{"min_batch": 1, "max_batch": None, "path": "p0"}]


def test_no_extra_path_when_its_measured_auc_breaks_the_limit():
    p = problem()
    sel = select(p, Constraints(max_auc_drop=0.001), 512, measure=lambda ch: 0.0)
    paths, _ = design_dispatch(p, sel, 0.001, measure=lambda ch: 0.0 if ch["t0"].pass_spec is None else 0.002)
    assert list(paths) == ["p0"]


def test_latency_target_sets_the_largest_batch_served_in_time():
    p = problem()
    sel = select(p, Constraints(latency_target=(100e-6, 64)), 512)
    paths, policy = design_dispatch(p, sel)
    n = policy["max_batch_within_target"]
    lat = lambda b: p.plan_cost(paths[route(policy["ranges"], b)], b).total  # noqa: E731
    assert lat(n) <= 100e-6 < lat(n + 1)


def test_max_batch_within_by_hand():
    assert max_batch_within(lambda b: 1e-3 + 1e-6 * b, 5e-3) == 4000
    assert max_batch_within(lambda b: 1.0, 0.5) == 0
    assert max_batch_within(lambda b: 0.0, 0.5) == 1 << 20


def test_route_rejects_uncovered_batches():
    with pytest.raises(ValueError, match="batch 5 is not covered"):
        route([{"min_batch": 10, "max_batch": None, "path": "p0"}], 5)
