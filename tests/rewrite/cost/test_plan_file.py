"""plan.json: round trip, validation, and plan -> passes -> rewritten model within the budget."""

import copy
import json
import struct

import pytest

from rewrite.cost.estimate import Estimator
from rewrite.cost.plan_file import check_plan_matches, load_plan, plan_paths, plan_to_passes, save_plan
from rewrite.cost.planner import build_problem, make_plan
from rewrite.cost.ilp import Constraints
from rewrite.core.errors import RewriteError
from rewrite.formats import native
from rewrite.pass_manager import apply
from tests.rewrite.cost.conftest import sample_of, synthetic_hw


@pytest.fixture
def plan_and_model(trained, test_passes):
    model, npz, pt = trained
    sample = sample_of(npz)
    problem, enum = build_problem(model, Estimator(synthetic_hw()), sample, None, test_passes, progress=False)
    budget = model.embedding_bytes() + model.dense_bytes() - 40_000
    plan, _ = make_plan(model, str(pt), problem, enum, Constraints(memory_budget=budget, max_auc_drop=0.002),
                        512, "torch", sample)
    return plan, model, sample, budget


def test_round_trip(plan_and_model, tmp_path):
    plan = plan_and_model[0]
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == json.loads(json.dumps(plan))


def test_plan_to_passes_rebuilds_the_planned_model_within_budget(plan_and_model, tmp_path):
    plan, model, sample, budget = plan_and_model
    passes = plan_to_passes(plan)
    planned = {t: e["pass"] for t, e in plan["paths"]["p0"]["tables"].items()}
    # one pass per distinct setting, restricted to exactly the tables that chose it
    assert sorted((str(cp).split(":tables=")[0], cp.config.tables) for cp in passes) == sorted(
        (s, tuple(sorted(t for t, x in planned.items() if x == s))) for s in set(planned.values()) if s)
    rewritten, report = apply(model, passes, sample=sample)
    for t, entry in plan["paths"]["p0"]["tables"].items():
        assert rewritten.embeddings[t].describe() == entry["describe"]
    assert rewritten.embedding_bytes() + rewritten.dense_bytes() == plan["paths"]["p0"]["bytes"]["value"]
    native.save(rewritten, tmp_path / "planned.safetensors")
    raw = (tmp_path / "planned.safetensors").read_bytes()
    tensor_bytes = len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]       # minus the JSON header
    assert tensor_bytes == plan["paths"]["p0"]["bytes"]["value"] <= budget
    assert set(plan_paths(plan)) == set(plan["paths"])


def test_plan_matches_only_its_model(plan_and_model):
    plan, model, _, _ = plan_and_model
    check_plan_matches(plan, model)
    other = copy.deepcopy(plan)
    other["model"]["tables"]["t0"]["rows"] = 5
    with pytest.raises(RewriteError, match=r"made for a different model \(table t0: plan 5x8, model 3000x8\)"):
        check_plan_matches(other, model)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(schema="plan/0"), "not a plan/1 plan (schema 'plan/0')"),
    (lambda p: p.update(paths={}), "'paths' must be a non-empty object"),
    (lambda p: p["paths"]["p0"]["tables"]["t0"].update({"pass": 3}), "paths.p0.tables.t0.pass must be a string or null"),
    (lambda p: p["dispatch"].update(ranges=[{"min_batch": 1, "path": "p7"}]), "dispatch.ranges[0] needs min_batch"),
])
def test_malformed_plans_are_named(plan_and_model, tmp_path, mutate, message):
    plan = copy.deepcopy(plan_and_model[0])
    mutate(plan)
    save_plan(plan, tmp_path / "bad.json")
    with pytest.raises(RewriteError, match="bad.json") as e:
        load_plan(tmp_path / "bad.json")
    assert message in str(e.value)


def test_unknown_path_and_unreadable_files(plan_and_model, tmp_path):
    with pytest.raises(RewriteError, match="plan has no path 'p9' \\(paths: p0"):
        plan_to_passes(plan_and_model[0], "p9")
    with pytest.raises(RewriteError, match="no such plan file"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(RewriteError, match="x.json: not JSON"):
        load_plan(tmp_path / "x.json")
