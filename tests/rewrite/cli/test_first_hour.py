"""Issue 22 (a new user's first hour), on a small trained model: the AUC gate of apply and
compile -p (item 3), one rule for existing outputs (4), strict JSON from every command (5),
bench naming a dropped contender (6), `rewrite passes` (9), plan's explain text (10)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rewrite.cli import main

torch.set_num_threads(1)
ROWS = (2, 40, 300, 2000)       # a 2-row table with one id used: profile's zipf exponent is NaN
LOSSY = "hash:collisions=64:max_error=10"     # loses ~0.1 AUC on this model: the gate must stop it


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def strict(text: str):
    """json.loads that refuses NaN / Infinity (what Python's json writes unless told not to)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def last_line(r) -> str:
    return r.stderr.replace("\r", "\n").strip().splitlines()[-1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A briefly trained 4-table DLRM (dlrm's format), a labelled day and the same day unlabelled."""
    from rewrite import data
    from rewrite.core.synthetic import Synthetic, SyntheticConfig, write_npz
    from rewrite.formats import dlrm
    from rewrite.training import table_dlrm, train

    d = tmp_path_factory.mktemp("first-hour")
    x_int, x_cat, y = Synthetic(SyntheticConfig(rows=ROWS, n_pairs=4, seed=3)).sample(6000, seed=0)
    x_cat[:, 0] = 0
    write_npz(d / "day.npz", x_int, x_cat, y)
    np.savez(d / "unlabelled.npz", X_int=x_int, X_cat=x_cat)
    model = table_dlrm(list(ROWS), n_dense=13, dim=4, bottom=(8, 4), top=(8, 1), seed=1)
    train(model, data.open(d / "day.npz"), epochs=3, lr=1e-2)
    dlrm.write(model.eval(), d / "model.pt", {"nepochs": 3})
    return d


# item 3 ---------------------------------------------------------------------------------------

def test_apply_auc_gate_stops_a_lossy_rewrite_unless_allowed(world, tmp_path):
    out = tmp_path / "m.safetensors"
    r = run("apply", world / "model.pt", "-p", LOSSY, "--data", world / "day.npz", "--json", "-o", out)
    assert r.exit_code == 1 and not out.exists()
    d = strict(r.stdout)
    gate = d["auc_gate"]
    assert gate["status"] == "failed" and gate["max_auc_drop"] == 0.005 and gate["auc_drop"] > 0.005
    assert not d["written"] and "exceeds --max-auc-drop 0.005" in d["failure"]
    assert "exceeds --max-auc-drop 0.005" in last_line(r) and "--allow-degraded" in last_line(r)

    r = run("apply", world / "model.pt", "-p", LOSSY, "--data", world / "day.npz", "--allow-degraded", "-o", out)
    assert r.exit_code == 0 and out.exists()
    assert "AUC gate (--max-auc-drop 0.005): ALLOWED" in r.stdout and "kept: --allow-degraded" in r.stdout

    r = run("apply", world / "model.pt", "-p", LOSSY, "--data", world / "day.npz", "--max-auc-drop", "0.5",
            "--json", "-o", tmp_path / "loose.safetensors")
    assert r.exit_code == 0 and strict(r.stdout)["auc_gate"]["status"] == "passed"

    r = run("apply", world / "model.pt", "-p", "quantize:bits=8", "--data", world / "day.npz",
            "-o", tmp_path / "q.safetensors")
    assert r.exit_code == 0 and "AUC gate: passed (drop " in r.stdout and "<= --max-auc-drop 0.005" in r.stdout


@pytest.mark.parametrize("data_args, why", [(["--data", "unlabelled.npz"], "has no labels"),
                                            ([], "no --data")])
def test_apply_auc_gate_without_labels_is_reported_not_measured(world, tmp_path, data_args, why):
    args = [world / a if a.endswith(".npz") else a for a in data_args]
    r = run("apply", world / "model.pt", "-p", LOSSY, *args, "--json", "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    gate = strict(r.stdout)["auc_gate"]
    assert gate["status"] == "not measured" and why in gate["note"] and gate["auc_drop"] is None


def test_compile_p_has_the_same_gate(world, tmp_path):
    r = run("compile", world / "model.pt", "-p", LOSSY, "--data", world / "day.npz", "--target", "torch",
            "--json", "-o", tmp_path / "b")
    assert r.exit_code == 1 and not (tmp_path / "b").exists()
    assert strict(r.stdout)["auc_gate"]["status"] == "failed" and "exceeds --max-auc-drop" in last_line(r)
    r = run("compile", world / "model.pt", "-p", LOSSY, "--data", world / "day.npz", "--target", "torch",
            "--allow-degraded", "--json", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert strict(r.stdout)["rewrite"]["auc_gate"]["status"] == "allowed"
    manifest = strict((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["rewrite"]["auc_gate"]["status"] == "allowed"
    r = run("compile", world / "model.pt", "--max-auc-drop", "0.01", "--target", "torch", "-o", tmp_path / "c")
    assert r.exit_code == 2 and "--max-auc-drop needs -p" in last_line(r)


def test_the_cli_default_is_the_library_default():
    from rewrite.cli.group import MAX_AUC_DROP_DEFAULT
    from rewrite.rewriting import DEFAULT_MAX_AUC_DROP

    assert MAX_AUC_DROP_DEFAULT == DEFAULT_MAX_AUC_DROP


# item 4 ---------------------------------------------------------------------------------------

WRITERS = {
    "apply -o": ["apply", "{model}", "-p", "quantize:bits=8", "-o", "{out}"],
    "compile -o": ["compile", "{model}", "--target", "torch", "-o", "{out}"],
    "profile -o": ["profile", "{model}", "--data", "{day}", "-o", "{out}"],
    "plan -o": ["plan", "{model}", "--data", "{day}", "--hardware", "zen4", "-o", "{out}"],
    "plan --plot": ["plan", "{model}", "--data", "{day}", "--hardware", "zen4", "--plot", "{out}"],
    "loadtest -o": ["loadtest", "http://127.0.0.1:9", "-o", "{out}"],
    "loadtest --plot": ["loadtest", "http://127.0.0.1:9", "--find-max", "--plot", "{out}"],
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_refuses_an_existing_output_without_force(world, tmp_path, writer):
    out = tmp_path / "existing"
    out.write_text("keep me")
    args = [a.format(model=world / "model.pt", day=world / "day.npz", out=out) for a in WRITERS[writer]]
    r = run(*args)
    assert r.exit_code == 2, r.output
    option = writer.split()[1]
    assert r.stderr.strip() == f"error: {option} {out}: already exists (use --force to replace it)"
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("writer", ["apply -o", "profile -o"])
def test_force_replaces(world, tmp_path, writer):
    out = tmp_path / "existing"
    out.write_text("old")
    args = [a.format(model=world / "model.pt", day=world / "day.npz", out=out) for a in WRITERS[writer]]
    r = run(*args, "--force")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() != b"old"


# item 5 ---------------------------------------------------------------------------------------

def test_every_json_output_parses_strictly(world, tmp_path):
    """One run of each command that prints JSON (loadtest: tests/serving/test_cli_serve.py)."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"quantize": ["bits=8", "bits=4"]}))
    model, day = world / "model.pt", world / "day.npz"
    commands = {
        "inspect": ["inspect", model],
        "profile": ["profile", model, "--data", day],
        "apply": ["apply", model, "-p", "quantize:bits=4", "--data", day, "-o", tmp_path / "q.safetensors"],
        "compile": ["compile", model, "--target", "torch", "-o", tmp_path / "b"],
        "inspect bundle": ["inspect", tmp_path / "b"],
        "verify": ["verify", tmp_path / "b", "--data", day],
        "bench": ["bench", tmp_path / "b", "--batch-sizes", "2", "--rounds", "1", "--hardware", "zen4"],
        "targets": ["targets"],
        "passes": ["passes"],
        "passes NAME": ["passes", "tt"],
        "hardware --presets": ["hardware", "--presets"],
        "hardware": ["hardware", "--hardware", "zen4"],
        "plan": ["plan", model, "--data", day, "--hardware", "zen4", "--grid", grid, "--explain",
                 "--memory-budget", "100KB"],
    }
    for name, args in commands.items():
        r = run(*args, "--json")
        assert r.exit_code == 0, (name, r.output)
        d = strict(r.stdout)
        assert isinstance(d, dict) and d, name
        if name == "profile":          # the 2-row table has one touched row: no slope to fit
            assert d["tables"][0]["zipf_exponent"] is None


# item 6 ---------------------------------------------------------------------------------------

def test_bench_names_a_contender_that_failed_verification(monkeypatch, tmp_path):
    import rewrite.bundling
    from rewrite import bench
    from rewrite.core.errors import VerificationError

    def failing(model, out, targets, **kw):
        raise VerificationError(f"{out}: path(s) failed verification and are not dispatched: "
                                f"fbgemm-int8: max |Δp| 0.0237 exceeds the tolerance 0.01")

    monkeypatch.setattr(rewrite.bundling, "compile_model", failing)
    monkeypatch.setattr("targets.base.get_target", lambda name: type("T", (), {"unavailable": lambda self: None})())
    monkeypatch.setattr("rewrite.formats.load", lambda path: None)

    class Bundle:
        paths: dict = {}

    spec, why = bench._fbgemm_contender(Bundle(), tmp_path / "ref.pt", tmp_path / "rewrite-bench-x")
    assert spec is None and why.startswith(bench.DROPPED)
    assert "rewrite-bench" not in why and str(tmp_path) not in why
    assert why.endswith("max |Δp| 0.0237 exceeds the tolerance 0.01")
    text = bench.human({"bundle": "b", "threads": 1, "rounds": 1, "baseline": bench.BASELINE,
                        "host": {"cpu": "c", "arch": "a", "tier": "t", "host_tier": "t"}, "results": [],
                        "absent": {}, "dropped": {"fbgemm-int8": why}})
    assert "fbgemm-int8: dropped, failed verification against the reference: max |Δp| 0.0237" in text


# item 9 ---------------------------------------------------------------------------------------

def test_passes_is_a_table_within_100_columns_and_one_pass_in_full():
    from rewrite.core.pass_contract import PASSES

    r = run("passes")
    assert r.exit_code == 0
    assert max(map(len, r.stdout.splitlines())) <= 100
    assert {line.split()[0] for line in r.stdout.splitlines()[1:] if line and not line[0].isspace()} >= set(PASSES)
    r = run("passes", "dhe")
    assert r.exit_code == 0 and max(map(len, r.stdout.splitlines())) <= 100
    opts = strict(run("passes", "dhe", "--json").stdout)["passes"][0]["options"]
    text = " ".join(r.stdout.split())
    for o in opts:                    # every option with its type, default and whole help text
        assert f"{o['name']} {o['type']} {o['default'] or '(all)'}" in text
        assert " ".join(o["help"].split()) in text
    r = run("passes", "nope")
    assert r.exit_code == 2 and "unknown pass 'nope' (known: " in r.stderr


# item 10 --------------------------------------------------------------------------------------

def test_plan_words():
    from rewrite.cost.commands import limits_text
    from rewrite.dispatch import batch_range
    from rewrite.cost.variants import spelled

    assert spelled("quantize") == "quantize:bits=8" and spelled("quantize:bits=4") == "quantize:bits=4"
    assert spelled("qr") == "qr:collisions=4" and spelled(None) == "keep" and spelled("md") == "md"
    assert [batch_range(1, None), batch_range(182, None), batch_range(1, 181)] == \
        ["every batch size", "182 and up", "1-181"]
    assert limits_text({"memory_budget_bytes": 100_000, "memory_budget_given": "100KB"}) == \
        "memory budget 100KB (100,000 bytes)"


def test_plan_explain_text(world, tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"quantize": ["bits=8", "bits=4"]}))
    r = run("plan", world / "model.pt", "--data", world / "day.npz", "--hardware", "zen4", "--grid", grid,
            "--memory-budget", "30KB", "--explain")
    assert r.exit_code == 0, r.output
    assert "limits: memory budget 30KB (30,000 bytes)" in r.stdout
    assert "- ->" not in r.stdout and "dispatch: " in r.stdout
    choices = {line.split()[1] for line in r.stdout.splitlines() if re.fullmatch(r"  t\d+ .*", line)}
    assert choices and all(c == "keep" or c.startswith("quantize:bits=") for c in choices), r.stdout
