"""``rewrite apply`` and ``rewrite passes``: exit codes 0/1/2, nothing written on 1 or 2, clean JSON."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import rewrite
from rewrite.cli import main
from rewrite.core.pass_contract import PASSES
from tests.pass_helpers import model_and_day

torch.set_num_threads(1)
ROWS = (3, 40, 257, 1000)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return model_and_day(tmp_path_factory.mktemp("cli"), ROWS)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(r) -> str:
    """The last stderr line (progress bars before it redraw with carriage returns)."""
    return r.stderr.replace("\r", "\n").strip().splitlines()[-1]


def test_apply_writes_and_reports(files, tmp_path):
    out = tmp_path / "q.safetensors"
    r = run("apply", files / "model.pt", "-p", "quantize:bits=4", "-p", "qr:tables=t3",
            "--data", files / "day.npz", "--samples", 1000, "--json", "-o", out)
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("embedding_bytes_before", "embedding_bytes_after", "max_abs_logit_diff", "auc_before",
                "auc_after", "logloss_before", "logloss_after", "tables"):
        assert key in d, key
    assert d["written"] and d["samples"] == 1000 and d["passes"] == ["quantize:bits=4", "qr:tables=t3"]
    assert d["embedding_bytes_after"] < d["embedding_bytes_before"]
    assert {(t["pass_name"], t["table"], t["status"]) for t in d["tables"]} >= {
        ("quantize", "t3", "rewritten"), ("qr", "t3", "skipped")}
    model = rewrite.load(out)
    assert model.embeddings["t3"].kind == "rowwise" and model.embeddings["t2"].bits == 4
    human = run("apply", files / "model.pt", "-p", "quantize:bits=8", "--data", files / "day.npz",
                "-o", tmp_path / "h.safetensors")
    assert human.exit_code == 0
    assert "AUC " in human.stdout and "max |Δ logit|" in human.stdout
    assert human.stdout.rstrip().endswith(f"written to {tmp_path / 'h.safetensors'}")
    shown = run("inspect", out)
    assert shown.exit_code == 0 and "(native)" in shown.stdout and "rowwise int4 1000x8" in shown.stdout


def test_apply_with_a_saved_profile(files, tmp_path):
    prof = tmp_path / "profile.json"
    assert run("profile", files / "model.pt", "--data", files / "day.npz", "-o", prof).exit_code == 0
    r = run("apply", files / "model.pt", "-p", "md:energy=0.8:max_error=1", "--profile", prof, "--json",
            "-o", tmp_path / "md.safetensors")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["profile"].endswith("day.npz") and d["verification_data"] == "random ragged batches"
    assert "auc_before" not in d


def test_tolerance_failure_exits_1_and_writes_nothing(files, tmp_path):
    out = tmp_path / "h.safetensors"
    r = run("apply", files / "model.pt", "-p", "hash:max_error=0.01", "--data", files / "day.npz",
            "--json", "-o", out)
    assert r.exit_code == 1
    assert not out.exists() and not list(tmp_path.iterdir())
    d = json.loads(r.stdout)                           # the report still comes out, alone on stdout
    assert not d["written"] and not d["within_tolerance"]
    assert error_line(r).startswith("error: rewrite exceeds its tolerance on t2 (hash: relative error <= 0.01")
    assert "Traceback" not in r.stderr
    ok = run("apply", files / "model.pt", "-p", "hash:max_error=0.01", "--allow-degraded", "-o", out)
    assert ok.exit_code == 0 and out.exists() and "EXCEEDED" in ok.stdout


@pytest.mark.parametrize("args,message", [
    (["-p", "nope"], "error: unknown pass 'nope'"),
    (["-p", "quantize:bitz=4"], "error: pass quantize: unknown option 'bitz'"),
    (["-p", "quantize:bits=3"], "error: pass quantize: option bits='3': must be one of 16, 8, 4, 2"),
    (["-p", "md:energy=1.5"], "error: pass md: energy must be in (0, 1], got 1.5"),
    (["-p", "quantize:tables=t7"], "error: pass quantize: unknown table(s) t7 (tables: t0, t1, t2, t3)"),
    (["-p", "md:rule=popularity:budget=1kB"], "error: pass md: budget 1kB (1000 B) is below the smallest"),
    (["-p", "quantize", "--data", "missing.npz"], "error: missing.npz: no such data file"),
    (["-p", "quantize", "--profile", "missing.json"], "error: missing.json: no such profile file"),
])
def test_bad_input_exits_2_and_writes_nothing(files, tmp_path, args, message):
    out = tmp_path / "x.safetensors"
    r = run("apply", files / "model.pt", *args, "--json", "-o", out)
    assert r.exit_code == 2, r.stdout + r.stderr
    assert error_line(r).startswith(message) and "Traceback" not in r.stderr
    assert r.stdout == "" and not list(tmp_path.iterdir())


def test_output_directory_and_click_errors_exit_2(files, tmp_path):
    r = run("apply", files / "model.pt", "-p", "quantize", "-o", tmp_path)
    assert r.exit_code == 2 and r.stderr == f"error: {tmp_path}: is a directory; -o takes the path of the file to write\n"
    r = run("apply", files / "model.pt", "-p", "quantize", "--samples", 0, "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--samples" in r.stderr
    r = run("apply", files / "model.pt", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "-p" in r.stderr and not list(tmp_path.iterdir())


def test_passes_lists_every_pass_options_and_what_defaults_touch():
    r = run("passes", "--json")
    assert r.exit_code == 0
    listed = {p["name"]: p for p in json.loads(r.stdout)["passes"]}
    assert set(listed) == set(PASSES)
    qr = listed["qr"]
    assert qr["defaults_touch"] == "tables with at least 201 rows"
    assert {"name": "collisions", "type": "int", "default": "4"}.items() <= \
        next(o for o in qr["options"] if o["name"] == "collisions").items()
    assert all(o["help"] for p in listed.values() for o in p["options"])
    human = " ".join(run("passes").stdout.split())          # a table wrapped to 100 columns
    assert "quantize fp32 tables -> fp16, or FBGEMM row-wise" in human
    one = run("passes", "onehot").stdout
    assert one.startswith("onehot: ") and "defaults touch: tables with at most 128 rows" in one
