"""`rewrite compile MODEL --plan plan.json`: plan -> compile -> a bundle whose measured footprint
meets the plan's budget, dispatch across plan paths through the runtime, fallback, bad input.

The planner keeps a single path on this small model (no other solution is 10% faster anywhere),
so the multi-path tests extend a real plan with a second path p1 and split the plan's batch
ranges, as ``rewrite.cost.dispatch`` writes them."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import rewrite.runtime
from rewrite.artifact import open_bundle
from rewrite.cli import main
from rewrite.core.model_file import load
from rewrite.core.synthetic import multi_hot_batch
from rewrite.verification import table_rows
from tests.tolerances import assert_close

BUDGET = 70_000          # bytes, tables + MLPs (the plan's --memory-budget 70KB)
TARGETS = ("--target", "onnx-cpu", "--target", "torch")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def planned(trained, test_passes, tmp_path):
    """(model, eval npz, model .pt, plan.json path, plan) from `rewrite plan` under a 70KB budget."""
    model, npz, pt = trained
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({k: list(v) for k, v in test_passes.items()}))
    r = run("plan", pt, "--data", npz, "--hardware", "zen4", "--memory-budget", "70KB",
            "--max-auc-drop", "0.01", "--samples", "4096", "--grid", grid, "-o", tmp_path / "plan.json")
    assert r.exit_code == 0, r.output + r.stderr
    return model, npz, pt, tmp_path / "plan.json", json.loads((tmp_path / "plan.json").read_text())


def two_path_plan(plan, p1_pass: str, split: int = 64, chunk: int | None = None) -> dict:
    """``plan`` plus p1 (every table rewritten by ``p1_pass``) serving batches below ``split``."""
    plan = copy.deepcopy(plan)
    p1 = copy.deepcopy(plan["paths"]["p0"])
    for entry in p1["tables"].values():
        entry["pass"] = p1_pass
    plan["paths"]["p1"] = p1
    plan["dispatch"]["ranges"] = [{"min_batch": 1, "max_batch": split - 1, "path": "p1"},
                                  {"min_batch": split, "max_batch": None, "path": "p0"}]
    if chunk is not None:
        plan["dispatch"]["max_batch_within_target"] = chunk
    return plan


def write(tmp_path, plan, name="plan2.json"):
    (tmp_path / name).write_text(json.dumps(plan))
    return tmp_path / name


def test_plan_compile_meets_the_memory_budget(planned, tmp_path):
    model, npz, pt, plan_file, plan = planned
    r = run("compile", pt, "--plan", plan_file, "--data", npz, *TARGETS, "-o", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output + r.stderr
    b = open_bundle(tmp_path / "b")
    assert set(b.paths) == {"p0-onnx-cpu", "p0-torch"} and set(b.verified_paths()) == set(b.paths)
    stored = load(tmp_path / "b" / b.manifest["variants"]["p0"]["model"]["path"])
    measured = stored.embedding_bytes() + stored.dense_bytes()          # tensors as stored in the bundle
    assert measured <= BUDGET and b.manifest["plan"]["resident_bytes"] == measured
    assert b.manifest["plan"]["memory_budget_bytes"] == BUDGET
    for name, table in plan["paths"]["p0"]["tables"].items():
        assert stored.embeddings[name].describe() == table["describe"]
        assert b.paths["p0-torch"]["representations"][name] == table["describe"]
    assert stored.embedding_bytes() < model.embedding_bytes()
    assert {r["path"] for r in b.manifest["dispatch"]["ranges"]} <= set(b.paths)
    assert b.manifest["dispatch"]["fallbacks"] == []


def test_compile_plan_without_data_fits_on_the_plans_data(planned, tmp_path):
    model, npz, pt, plan_file, plan = planned
    assert plan["fitted_on"] == {"data": str(npz.resolve()), "profile": None}
    r = run("compile", pt, "--plan", plan_file, "--target", "torch", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output + r.stderr
    assert f"note: fitting the tables on the plan's data {npz.resolve()}" in r.stderr
    r = run("compile", pt, "--plan", plan_file, "--data", npz, "--target", "torch", "-o", tmp_path / "c")
    assert r.exit_code == 0 and "note:" not in r.stderr
    models = [load(tmp_path / d / open_bundle(tmp_path / d).manifest["variants"]["p0"]["model"]["path"]) for d in "bc"]
    for k, v in models[0].state_dict().items():          # the tables the plan measured, either way
        assert torch.equal(v, models[1].state_dict()[k]), k
    gone = copy.deepcopy(plan)
    gone["fitted_on"]["data"] = str(tmp_path / "moved.npz")
    r = run("compile", pt, "--plan", write(tmp_path, gone), "--target", "torch", "-o", tmp_path / "d")
    assert r.exit_code == 0, r.output + r.stderr
    assert "warning: the plan's tables were fitted on" in r.stderr and "uniform row weights" in r.stderr


def eager(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model(*batch.inputs()).numpy()


def test_runtime_dispatches_across_plan_paths(planned, tmp_path):
    model, npz, pt, _, plan = planned
    plan_file = write(tmp_path, two_path_plan(plan, "test-half:dtype=float16", split=64, chunk=100))
    r = run("compile", pt, "--plan", plan_file, *TARGETS, "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output + r.stderr
    pred = rewrite.runtime.load(tmp_path / "b")
    b = pred.bundle
    variants = {v: load(tmp_path / "b" / e["model"]["path"]) for v, e in b.manifest["variants"].items()}
    assert all(rep.describe().endswith("float16")
               for rep in variants["p1"].embeddings.values())
    assert b.paths[b.path_for_batch(8)]["plan_path"] == "p1"
    assert b.paths[b.path_for_batch(80)]["plan_path"] == "p0"
    rows, n_dense = table_rows(model), model.spec.n_dense
    for size, want in ((8, "p1"), (80, "p0")):
        batch = multi_hot_batch(rows, size, n_dense, 2.0, seed=size)
        got = pred.logits(*batch.inputs())
        assert_close(got, eager(variants[want], batch), "compiled-fp32-logits", f"B={size} on {want}")
        other = eager(variants["p0" if want == "p1" else "p1"], batch)
        assert np.abs(got - other).max() > 1e-4          # the two paths really differ
    # 250 rows > max_batch_within_target 100: chunks 0-99, 100-199 on p0, 200-249 (50 < 64) on p1
    batch = multi_hot_batch(rows, 250, n_dense, 2.0, seed=7)
    want = eager(variants["p0"], batch)
    want[200:] = eager(variants["p1"], batch)[200:]
    assert_close(pred.logits(*batch.inputs()), want, "compiled-fp32-logits", "B=250 in chunks")

    r = run("inspect", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    for name, p in info["paths"].items():
        v = variants[p["plan_path"]]
        assert p["representations"] == {t: rep.describe() for t, rep in v.embeddings.items()}
        assert p["embedding_bytes"] > 0 and p["footprint_bytes"] > 0
    assert info["variants"]["p1"]["embedding_bytes"] == variants["p1"].embedding_bytes()
    assert info["variants"]["p1"]["paths"] == ["p1-onnx-cpu", "p1-torch"]


def test_failed_plan_path_falls_back_to_the_fastest_verified(planned, tmp_path):
    model, npz, pt, _, plan = planned
    plan_file = write(tmp_path, two_path_plan(plan, "hash:max_error=0.01:min_rows=0"))
    r = run("compile", pt, "--plan", plan_file, "--target", "torch", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output + r.stderr
    assert "warning: plan path p1: not verified" in r.stderr
    m = open_bundle(tmp_path / "b").manifest
    assert m["variants"]["p1"]["verified"] is False and "model" not in m["variants"]["p1"]
    assert [f["plan_path"] for f in m["dispatch"]["fallbacks"]] == ["p1"]
    assert {r["path"] for r in m["dispatch"]["ranges"]} == {"p0-torch"}
    assert not (tmp_path / "b" / "rewritten" / "p1.safetensors").exists()


def test_every_plan_path_failing_is_exit_1_and_writes_nothing(planned, tmp_path):
    model, npz, pt, _, plan = planned
    bad = two_path_plan(plan, "hash:max_error=0.01:min_rows=0")
    bad["paths"]["p0"] = copy.deepcopy(bad["paths"]["p1"])
    bad["paths"]["p0"]["tables"]["t0"]["pass"] = "hash:max_error=0.02:min_rows=0"
    r = run("compile", pt, "--plan", write(tmp_path, bad), "--target", "torch", "-o", tmp_path / "b")
    assert r.exit_code == 1, r.output + r.stderr
    assert "no plan path passed verification; nothing written" in r.stderr
    assert not (tmp_path / "b").exists()


def test_identical_plan_paths_are_stored_once(planned, tmp_path):
    model, npz, pt, _, plan = planned
    twin = two_path_plan(plan, "x")
    twin["paths"]["p1"] = copy.deepcopy(plan["paths"]["p0"])
    r = run("compile", pt, "--plan", write(tmp_path, twin), "--target", "torch", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output + r.stderr
    m = open_bundle(tmp_path / "b").manifest
    assert m["variants"]["p1"]["same_as"] == "p0" and set(m["paths"]) == {"p0-torch"}
    assert sorted(p.name for p in (tmp_path / "b" / "rewritten").iterdir()) == ["p0.safetensors"]
    assert m["dispatch"]["fallbacks"] == []


@pytest.mark.parametrize("edit, args, message", [
    (lambda p: p["model"]["tables"]["t0"].update(rows=10), (),
     "made for a different model (table t0: plan 10x8, model 3000x8)"),
    (lambda p: p.update(schema="plan/0"), (), "not a plan/1 plan (schema 'plan/0')"),
    (lambda p: p["paths"]["p0"]["tables"]["t0"].update({"pass": "nope"}), (), "unknown pass 'nope'"),
    (None, ("-p", "quantize"), "-p and --plan: give one or the other"),
    (None, ("--target", "nope"), "unknown target"),
])
def test_bad_plan_input_is_exit_2_and_writes_nothing(planned, tmp_path, edit, args, message):
    model, npz, pt, plan_file, plan = planned
    if edit is not None:
        plan = copy.deepcopy(plan)
        edit(plan)
        plan_file = write(tmp_path, plan)
    r = run("compile", pt, "--plan", plan_file, *args, "-o", tmp_path / "b")
    assert r.exit_code == 2, r.output + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()


def test_api_compile_plan_without_data_fits_on_the_plans_data(planned, tmp_path, caplog):
    model, npz, pt, plan_file, plan = planned
    with caplog.at_level("WARNING", logger="rewrite"):
        rewrite.compile(pt, tmp_path / "b", plan=plan_file, targets=["torch"])
    assert f"fitting the tables on the plan's data {npz.resolve()}" in caplog.text
    rewrite.compile(pt, tmp_path / "c", plan=plan_file, data=npz, targets=["torch"])
    models = [load(tmp_path / d / open_bundle(tmp_path / d).manifest["variants"]["p0"]["model"]["path"]) for d in "bc"]
    for k, v in models[0].state_dict().items():          # the API fits as the CLI does
        assert torch.equal(v, models[1].state_dict()[k]), k
