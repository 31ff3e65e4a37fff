"""The ILP against brute force on small random problems; infeasibility."""

import numpy as np
import pytest

from rewrite.cost.estimate import DenseFacts, Estimator, TableStats
from rewrite.cost.ilp import Constraints, Infeasible, Problem, brute_force, solve
from rewrite.cost.types import RepFacts, Variant
from tests.rewrite.cost.conftest import synthetic_hw


def variant(table, name, nbytes, ops, rows_bytes=64.0, drop=0.0, tier="dram", flops=16.0):
    facts = RepFacts(((rows_bytes, float(nbytes), 1.0),), flops, "fp32", (rows_bytes, 0.0, 0.0),
                     (0.0, 0.0, 0.0), ops, rows_bytes)
    return Variant(table, name, name or "keep", tier, int(nbytes), facts, 0.0, drop)


def random_problem(seed, tables=3, per_table=4, dense_bytes=1000):
    rng = np.random.default_rng(seed)
    variants = {}
    for t in range(tables):
        vs = [variant(f"t{t}", None, rng.integers(50_000, 500_000), int(rng.integers(2, 10)))]
        for k in range(per_table - 1):
            vs.append(variant(f"t{t}", f"p{k}", rng.integers(1_000, 400_000), int(rng.integers(2, 40)),
                              rows_bytes=float(rng.choice([16, 32, 64, 256])),
                              drop=float(rng.uniform(0, 0.002))))
        variants[f"t{t}"] = vs
    return Problem(variants, Estimator(synthetic_hw()), {t: TableStats() for t in variants},
                   DenseFacts((), 0.0, 0), dense_bytes)


@pytest.mark.parametrize("seed", range(12))
def test_milp_matches_brute_force(seed):
    p = random_problem(seed)
    rng = np.random.default_rng(100 + seed)
    keep_bytes = sum(vs[0].num_bytes for vs in p.variants.values()) + p.dense_bytes
    lat_keep = p.plan_cost({t: vs[0] for t, vs in p.variants.items()}, 256).total
    c = Constraints(memory_budget=int(keep_bytes * rng.uniform(0.2, 0.9)),
                    max_auc_drop=float(rng.uniform(0.0005, 0.004)),
                    latency_target=(lat_keep * rng.uniform(0.8, 1.5), 256) if seed % 2 else None)
    for objective in ("latency", "memory", "auc"):
        try:
            ref = brute_force(p, c, 512, objective)
        except Infeasible:
            with pytest.raises(Infeasible):
                solve(p, c, 512, objective)
            continue
        got = solve(p, c, 512, objective)
        assert got.objective == pytest.approx(ref.objective, rel=1e-7, abs=1e-12)
        assert not p.violations(got.choice, c)


def test_exclusions_and_forced_out_variants():
    p = random_problem(3)
    best = solve(p, Constraints(), 512)
    second = solve(p, Constraints(), 512, exclude=[best.choice])
    assert second.choice != best.choice and second.objective >= best.objective
    t0 = best.choice["t0"]
    other = solve(p, Constraints(), 512, fixed_out=(t0,))
    assert other.choice["t0"] is not t0


def test_tier_capacities_are_constraints():
    hw = synthetic_hw()
    p = Problem({"t0": [variant("t0", None, 2 << 30, 2), variant("t0", "small", 1000, 9)]},
                Estimator(hw), {"t0": TableStats()}, DenseFacts((), 0.0, 0), 0)
    assert solve(p, Constraints(), 512).choice["t0"].pass_spec == "small"   # 2 GiB > 1 GiB dram
    assert p.violations({"t0": p.variants["t0"][0]}, Constraints()) == ["dram capacity"]


def test_nothing_fits_is_infeasible():
    p = random_problem(1)
    with pytest.raises(Infeasible):
        solve(p, Constraints(memory_budget=10), 512)
    with pytest.raises(Infeasible):
        brute_force(p, Constraints(memory_budget=10), 512)
