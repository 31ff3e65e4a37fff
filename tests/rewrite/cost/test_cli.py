"""`rewrite hardware` and `rewrite plan` through click, in process."""

import json

import pytest
from click.testing import CliRunner

from rewrite.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_hardware_preset_json():
    r = run("hardware", "--hardware", "a100", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["name"] == "a100" and d["source"] == "spec" and [t["name"] for t in d["tiers"]] == ["l2", "hbm", "host"]


def test_hardware_human_and_presets():
    r = run("hardware", "--hardware", "zen4")
    assert r.exit_code == 0 and "dram" in r.output and "TFLOP/s peak" in r.output
    r = run("hardware", "--presets")
    assert r.exit_code == 0 and "accel-matrix" in r.output and "h200" in r.output


def test_hardware_unknown_is_exit_2():
    r = run("hardware", "--hardware", "nope")
    assert r.exit_code == 2
    assert "error: --hardware: unknown 'nope'" in r.output


@pytest.fixture
def grid_file(tmp_path, test_passes):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({k: list(v) for k, v in test_passes.items()}))
    return path


def test_plan_writes_plan_plot_and_explains(trained, grid_file, tmp_path):
    model, npz, pt = trained
    r = run("plan", pt, "--data", npz, "--hardware", "zen4", "--memory-budget", "70KB",
            "--max-auc-drop", "0.002", "--latency-target", "2ms@512", "--grid", grid_file,
            "--explain", "--plot", tmp_path / "pareto.png", "-o", tmp_path / "plan.json")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["hardware"]["name"] == "zen4" and plan["estimator"]["source"] == "estimated"
    assert plan["paths"]["p0"]["bytes"]["value"] <= 70_000
    assert plan["constraints"]["latency_target"] == {"seconds": 0.002, "batch": 512}
    assert len(plan["explain"]) == 4 and plan["pareto"]["points"]
    assert plan["pareto"]["axes"]["latency_s"] == "estimated"
    assert (tmp_path / "pareto.png").exists()
    assert "binding:" in r.output and "plan written to" in r.output
    # issue 22 item 10: open ranges in words, the budget as written and in bytes
    assert "- ->" not in r.output and ("dispatch: every batch size -> p0" in r.output or " and up -> p" in r.output)
    assert "limits: memory budget 70KB (70,000 bytes), AUC drop <= 0.002, latency <= 2 ms at batch 512" in r.output
    assert plan["constraints"]["memory_budget_given"] == "70KB"


def test_plan_json_on_stdout(trained, grid_file):
    model, npz, pt = trained
    r = run("plan", pt, "--data", npz, "--hardware", "h100", "--grid", grid_file, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output[r.output.index("{"):])
    assert d["schema"] == "plan/1" and d["written"] == {"plan": None, "plot": None}
    assert {e["tier"] for e in d["paths"]["p0"]["tables"].values()} <= {"hbm", "host"}


@pytest.mark.parametrize("extra, message", [
    (["--memory-budget", "1KB"], "error: no plan fits: --memory-budget 1KB (1,000 bytes) cannot be met"),
    (["--memory-budget", "10XB"], "error: cannot read '10XB' as a byte size"),
    (["--latency-target", "5ms"], "error: --latency-target '5ms': write TIME@BATCH, e.g. 5ms@512"),
    (["--latency-target", "5parsecs@512"], "error: cannot read '5parsecs' as a time"),
    (["--max-auc-drop", "2"], "error: --max-auc-drop must be in [0, 1), got 2.0"),
    (["--batch", "0"], "error: --batch must be >= 1, got 0"),
    (["--hardware", "missing.json"], "error: missing.json: no such hardware spec file"),
])
def test_plan_bad_input_is_exit_2(trained, grid_file, extra, message):
    model, npz, pt = trained
    r = run("plan", pt, "--data", npz, "--hardware", "zen4", "--grid", grid_file, *extra)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_plan_bad_grid_and_data(trained, tmp_path):
    model, npz, pt = trained
    (tmp_path / "g.json").write_text('{"qr": "collisions=4"}')
    r = run("plan", pt, "--data", npz, "--hardware", "zen4", "--grid", tmp_path / "g.json")
    assert r.exit_code == 2 and 'a grid is {"pass": ["opt=v:opt=v", ...], ...}' in r.output
    r = run("plan", pt, "--data", tmp_path / "none.npz", "--hardware", "zen4")
    assert r.exit_code == 2 and "no such data file" in r.output
