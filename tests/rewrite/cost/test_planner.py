"""The planning loop end to end on a small trained model with real (test) passes."""

import pytest

from rewrite.cost.estimate import Estimator
from rewrite.cost.planner import build_problem, make_plan
from rewrite.cost.ilp import Constraints
from rewrite.core.errors import RewriteError
from tests.rewrite.cost.conftest import sample_of, synthetic_hw


@pytest.fixture
def planned(trained, test_passes):
    model, npz, pt = trained
    sample = sample_of(npz)
    problem, enum = build_problem(model, Estimator(synthetic_hw()), sample, None, test_passes, progress=False)
    return model, pt, sample, problem, enum


def test_plan_meets_budget_and_measured_auc(planned):
    model, pt, sample, problem, enum = planned
    keep_bytes = model.embedding_bytes() + model.dense_bytes()
    c = Constraints(memory_budget=keep_bytes - 40_000, max_auc_drop=0.002)
    plan, sel = make_plan(model, str(pt), problem, enum, c, 512, "torch", sample)
    p0 = plan["paths"]["p0"]
    assert p0["bytes"] == {"value": problem.footprint(sel.solution.choice).total, "source": "counted"}
    assert p0["bytes"]["value"] <= keep_bytes - 40_000
    assert p0["auc_drop"]["source"] == "measured" and p0["auc_drop"]["value"] <= 0.002
    assert plan["quality"]["auc_before"] == enum.auc_base and plan["quality"]["samples"] == 6000
    for t, entry in p0["tables"].items():
        assert entry["latency_s"]["source"] == "estimated" and entry["rel_error"]["source"] == "measured"
        assert entry["pass"] in {v.pass_spec for v in enum.variants[t]}
    assert plan["dispatch"]["ranges"][0]["min_batch"] == 1


def test_max_auc_drop_without_labels_is_an_error(planned):
    model, pt, sample, problem, enum = planned
    enum.labelled = False
    with pytest.raises(RewriteError, match="--max-auc-drop and --recover need labelled data: --data has no y"):
        make_plan(model, str(pt), problem, enum, Constraints(max_auc_drop=0.001), 512, "torch", sample)


def test_impossible_budget_is_a_clear_error(planned):
    model, pt, sample, problem, enum = planned
    with pytest.raises(RewriteError, match=r"^no plan fits: --memory-budget 1,000 bytes cannot be met: "
                                           r"the best plan within the other limits needs"):
        make_plan(model, str(pt), problem, enum, Constraints(memory_budget=1000), 512, "torch", sample)
