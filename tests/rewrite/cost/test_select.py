"""The measure-and-revise loop, the infeasibility diagnosis and --explain, on small problems."""

import pytest

from rewrite.cost.estimate import DenseFacts, Estimator, TableStats
from rewrite.cost.select import explain, select
from rewrite.cost.ilp import Constraints, Problem, solve
from rewrite.core.errors import RewriteError
from tests.rewrite.cost.conftest import synthetic_hw
from tests.rewrite.cost.test_ilp import variant


def problem():
    """Two tables; per table: keep (big, slow), 'a' (small, fast, lossy), 'b' (medium, lossless)."""
    variants = {}
    for t in ("t0", "t1"):
        variants[t] = [variant(t, None, 400_000, 20, rows_bytes=256),
                       variant(t, "a", 10_000, 2, rows_bytes=16, drop=0.0004),
                       variant(t, "b", 100_000, 10, rows_bytes=64, drop=0.0)]
    return Problem(variants, Estimator(synthetic_hw()), {t: TableStats() for t in variants},
                   DenseFacts((), 0.0, 0), 1000)


def superadditive(choice):
    """Whole-plan AUC drop: 1.5x the per-table sum (interactions make it worse)."""
    return 1.5 * sum(v.auc_drop for v in choice.values())


def test_revises_until_the_measured_plan_meets_the_budget():
    p = problem()
    c = Constraints(max_auc_drop=0.001)
    first = solve(p, c, 512).choice                        # both tables 'a': sum 0.0008 <= 0.001
    assert {v.pass_spec for v in first.values()} == {"a"}
    sel = select(p, c, 512, measure=superadditive)
    assert sel.measured_auc_drop <= 0.001
    assert len(sel.revisions) == 1
    rev = sel.revisions[0]
    assert rev["auc_drop_measured"] == pytest.approx(0.0012) and rev["auc_drop_estimated"] == pytest.approx(0.0008)
    # tightened: min(0.001, 0.0008) * 0.001 / 0.0012 * 0.9 = 0.0006
    assert sel.constraints.max_auc_drop == pytest.approx(0.0006)
    assert sorted(v.pass_spec for v in sel.solution.choice.values()) == ["a", "b"]


def test_gives_up_with_the_best_measured_plan():
    p = problem()
    with pytest.raises(RewriteError, match=r"no plan meets --max-auc-drop 0.001 measured as a whole: "
                                           r"\d plan\(s\) measured, the best dropped AUC by 0.002"):
        select(p, Constraints(max_auc_drop=0.001), 512, measure=lambda ch: 0.002)


def test_without_measurement_the_first_solution_stands():
    p = problem()
    sel = select(p, Constraints(max_auc_drop=0.001), 512)
    assert sel.measured_auc_drop is None and not sel.revisions


def test_impossible_memory_budget_names_the_constraint_and_the_best_achievable():
    p = problem()
    with pytest.raises(RewriteError) as e:
        select(p, Constraints(memory_budget=5_000), 512)
    # smallest plan: 2 x 10 000 + 1 000 dense = 21 000 B
    assert str(e.value) == ("no plan fits: --memory-budget 5,000 bytes cannot be met: the best plan "
                            "within the other limits needs 21,000 bytes")
    with pytest.raises(RewriteError) as e:                 # echoed in the unit the user wrote, and exactly
        select(p, Constraints(memory_budget=5_000, memory_budget_text="5KB"), 512)
    assert str(e.value) == ("no plan fits: --memory-budget 5KB (5,000 bytes) cannot be met: the best plan "
                            "within the other limits needs 21KB (21,000 bytes)")


def test_memory_and_quality_conflict_is_diagnosed_with_the_other_limit_applied():
    p = problem()
    with pytest.raises(RewriteError, match=r"--memory-budget 50,000 bytes cannot be met: the best plan "
                                           r"within the other limits needs 201,000 bytes"):
        select(p, Constraints(memory_budget=50_000, max_auc_drop=0.0), 512)


def test_capacity_of_the_device_is_diagnosed():
    p = problem()
    tiny = synthetic_hw(tiers=(synthetic_hw().tiers[0], synthetic_hw().tiers[1].__class__(
        "dram", 10_000, 10e9, 100e-9)))
    p = Problem(p.variants, Estimator(tiny), p.stats, p.dense, p.dense_bytes)
    with pytest.raises(RewriteError, match=r"no plan fits: the smallest plan needs 20.51 KiB; "
                                           r"synthetic holds 9.77 KiB \(dram 9.77 KiB\)"):
        select(p, Constraints(), 512)


def test_explain_binding_quality():
    p = problem()
    sel = select(p, Constraints(memory_budget=120_000, max_auc_drop=0.0005), 512)
    rows = {r["table"]: r for r in explain(p, sel, 512)}
    # (a, a) drops 0.0008 > 0.0005; (b, b) needs 201 000 B > 120 000: one of each.
    assert sorted(r["choice"] for r in rows.values()) == ["a", "b"]
    for r in rows.values():
        assert r["runner_up"]["pass"] in ("a", "b") and r["runner_up"]["objective_increase_s"] >= -1e-12
        if r["choice"] == "a":
            assert r["binding"] == "none: the fastest variant of this table"
        else:
            assert r["binding"] == "AUC drop (the faster a would break it)"
        assert r["latency_s"]["source"] == "estimated" and r["auc_drop"]["source"] == "measured"


def test_explain_binding_memory():
    variants = {t: [variant(t, None, 400_000, 2), variant(t, "a", 10_000, 60, rows_bytes=16)]
                for t in ("t0", "t1")}
    p = Problem(variants, Estimator(synthetic_hw()), {t: TableStats() for t in variants},
                DenseFacts((), 0.0, 0), 1000)
    sel = select(p, Constraints(memory_budget=420_000), 512)
    rows = {r["table"]: r for r in explain(p, sel, 512)}
    assert sorted(r["choice"] for r in rows.values()) == ["a", "keep"]
    small = next(r for r in rows.values() if r["choice"] == "a")
    assert small["binding"] == "memory budget 420,000 bytes (the faster keep would break it)"
    # runner-up: the mirror plan (this table kept, the other one small), equally fast
    assert small["runner_up"]["pass"] == "keep"
    assert small["runner_up"]["objective_increase_s"] == pytest.approx(0.0, abs=1e-12)


def test_runner_up_none_when_no_other_variant_fits():
    variants = {"t0": [variant("t0", None, 400_000, 2), variant("t0", "a", 10_000, 60, rows_bytes=16)]}
    p = Problem(variants, Estimator(synthetic_hw()), {"t0": TableStats()}, DenseFacts((), 0.0, 0), 0)
    sel = select(p, Constraints(memory_budget=20_000), 512)
    (row,) = explain(p, sel, 512)
    assert row["choice"] == "a"
    assert row["runner_up"] == {"pass": None, "reason": "no other variant of this table fits the limits"}
