"""Planning with recovery: the best few candidates by the estimate are recovered and measured,
the plan keeps the recipe and has one path, `rewrite compile --plan` recovers the same way, and
impossible limits or misused options are one clear line."""

import json

import pytest

import rewrite
from rewrite.core.errors import RewriteError
from rewrite.cost.commands import _recovery
from rewrite.cost.estimate import Estimator
from rewrite.cost.ilp import Constraints
from rewrite.cost.planner import build_problem, make_measure, make_plan
from rewrite.cost.recovered import RecoverySettings
from tests.rewrite.cost.conftest import sample_of, synthetic_hw


@pytest.fixture
def planned(trained, test_passes):
    model, npz, pt = trained
    sample = sample_of(npz)
    problem, enum = build_problem(model, Estimator(synthetic_hw()), sample, None, test_passes, progress=False)
    return model, npz, pt, sample, problem, enum


def budget_of(model):
    return model.embedding_bytes() // 3 + model.dense_bytes()       # forces lossy tables


def test_candidates_are_recovered_measured_and_the_chosen_one_keeps_the_bound(planned):
    model, npz, pt, sample, problem, enum = planned
    c = Constraints(memory_budget=budget_of(model), max_auc_drop=0.05)
    settings = RecoverySettings(npz.parent / "train.npz", candidates=2)
    plan, sel = make_plan(model, str(pt), problem, enum, c, 512, "torch", sample, settings)
    rec = plan["recovery"]
    assert rec["data"] == str(settings.data) and len(rec["sha256"]) == 64 and rec["train_top"] is False
    tried = rec["candidates_measured"]
    assert len(tried) == 2 and sum(t["chosen"] for t in tried) == 1
    assert len({json.dumps(t["plan"], sort_keys=True) for t in tried}) == 2          # distinct plans
    assert tried[0]["auc_drop_estimated"] <= tried[1]["auc_drop_estimated"]            # best estimate first
    fitted = make_measure(model, enum, sample)
    for t in tried:
        assert t["bytes"] <= c.memory_budget and t["recovery_steps"] > 0
        choice = {tb: next(v for v in enum.variants[tb] if v.pass_spec == spec) for tb, spec in t["plan"].items()}
        assert t["auc_drop_recovered"] < fitted(choice)          # recovery repaired the fitted plan
    chosen = next(t for t in tried if t["chosen"])
    p0 = plan["paths"]["p0"]
    assert list(plan["paths"]) == ["p0"] and p0["auc_drop"]["source"] == "measured after recovery"
    assert p0["auc_drop"]["value"] == chosen["auc_drop_recovered"] <= 0.05
    assert {t: e["pass"] for t, e in p0["tables"].items()} == chosen["plan"]


def test_no_candidate_within_the_bound_is_one_clear_error(planned):
    model, npz, pt, sample, problem, enum = planned
    c = Constraints(memory_budget=budget_of(model), max_auc_drop=-1.0)
    with pytest.raises(RewriteError, match=r"^no plan meets --max-auc-drop -1 after recovery: 1 candidate\(s\) "
                                           r"recovered and measured, the best dropped AUC by"):
        make_plan(model, str(pt), problem, enum, c, 512, "torch", sample,
                  RecoverySettings(npz.parent / "train.npz", candidates=1))


def test_compile_plan_recovers_the_primary_path(planned, tmp_path):
    model, npz, pt, sample, problem, enum = planned
    c = Constraints(memory_budget=budget_of(model), max_auc_drop=0.05)
    plan, _ = make_plan(model, str(pt), problem, enum, c, 512, "torch", sample,
                        RecoverySettings(npz.parent / "train.npz", candidates=1))
    (tmp_path / "plan.json").write_text(json.dumps(plan, default=float))
    manifest = rewrite.compile(pt, tmp_path / "bundle", plan=tmp_path / "plan.json", targets=["torch"])
    assert manifest["variants"]["p0"]["recovered_on"] == str(npz.parent / "train.npz")
    served = rewrite.load(tmp_path / "bundle" / "rewritten" / "p0.safetensors")
    fitted, _ = rewrite.apply(model, rewrite.cost.plan_file.plan_to_passes(plan))
    changed = [t for t, e in plan["paths"]["p0"]["tables"].items() if e["pass"] is not None]
    import torch

    assert any(not torch.equal(served.embeddings[t].state_dict()[k], v)
               for t in changed for k, v in fitted.embeddings[t].state_dict().items() if v.is_floating_point())
    plan["recovery"]["sha256"] = "0" * 64
    (tmp_path / "plan.json").write_text(json.dumps(plan, default=float))
    with pytest.raises(RewriteError, match="differs from the recovery data the plan was measured with"):
        rewrite.compile(pt, tmp_path / "bundle2", plan=tmp_path / "plan.json", targets=["torch"])


@pytest.mark.parametrize("args, message", [
    (("SAME", "DATA", 3, False), "is the --data the plan measures AUC on: recover on data kept apart"),
    ((None, "DATA", 3, True), "--recover-top only applies with --recover DATA"),
    (("TRAIN", "DATA", 0, False), "--recover-candidates must be >= 1, got 0"),
    (("MISSING", "DATA", 3, False), "no such data file"),
])
def test_option_errors(trained, args, message):
    _, npz, _ = trained
    paths = {"SAME": npz, "DATA": npz, "TRAIN": npz.parent / "train.npz", "MISSING": npz.parent / "nope.npz", None: None}
    with pytest.raises(RewriteError, match=message):
        _recovery(paths[args[0]], paths[args[1]], args[2], args[3])


def test_planning_with_recovery_keeps_variants_beyond_their_tolerance(trained, monkeypatch):
    """The per-table tolerance is about the fitted table: recovery repairs it, so those variants
    stay candidates (here robe at 16x, far beyond its tolerance on these tables)."""
    model, npz, _ = trained
    sample = sample_of(npz)
    grid = {"robe": ("compression=16",)}
    _, strict = build_problem(model, Estimator(synthetic_hw()), sample, None, grid, progress=False)
    _, kept = build_problem(model, Estimator(synthetic_hw()), sample, None, grid, progress=False, keep_degraded=True)
    beyond = {s["table"] for s in strict.skipped if "exceeds its tolerance" in s["reason"]}
    assert beyond
    for t in beyond:
        assert not any(v.pass_spec for v in strict.variants[t])
        assert any(v.pass_spec and v.pass_spec.startswith("robe") for v in kept.variants[t]), kept.variants[t]
    assert not any("exceeds its tolerance" in s["reason"] for s in kept.skipped)
