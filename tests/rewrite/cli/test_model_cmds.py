"""The ``rewrite`` command: inspect and profile output (human and --json), and every bad input:
exit 2, one line on stderr naming the file/option and the problem, no traceback (--debug shows it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import rewrite
from rewrite.cli import main
from rewrite.core.access_profile import AccessProfile
from tests.reference_dlrm import DLRM_Net, save_like_dlrm

ROOT = Path(__file__).resolve().parents[3]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_human(day_files):
    r = run("inspect", day_files.model)
    assert r.exit_code == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0] == f"{day_files.model}  (dlrm)"
    assert "dense 13 -> bottom [8, 4]  interaction dot  top [8, 1]" in lines[1]
    assert "4 tables" in lines[2]
    for name, rows in zip(["t0", "t1", "t2", "t3"], day_files.rows):
        assert any(line.split()[:3] == [name, f"{rows:,}", "4"] for line in lines), name
    assert "training metadata: nepochs=1, test_auc=0.75, iter=10" in r.stdout


def test_inspect_json_schema(day_files):
    r = run("inspect", day_files.model, "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)                        # stdout is the JSON object and nothing else
    assert d["format"] == "dlrm" and d["schema"] == "inspect/1"
    assert [t["name"] for t in d["tables"]] == ["t0", "t1", "t2", "t3"]
    for t, rows in zip(d["tables"], day_files.rows):
        assert {"name", "rows", "dim", "representation", "bytes"} <= set(t)
        assert (t["rows"], t["dim"], t["representation"], t["bytes"]) == (rows, 4, "table", rows * 4 * 4)
    assert d["embedding_bytes"] == sum(day_files.rows) * 4 * 4
    # bottom 13-8-4, top (4 + 10 dot pairs of 5 vectors)-8-1, weights + biases, fp32
    assert d["dense_bytes"] == ((13 + 1) * 8 + (8 + 1) * 4 + (14 + 1) * 8 + (8 + 1) * 1) * 4
    assert d["provenance"]["metadata"] == {"nepochs": 1, "test_auc": 0.75, "iter": 10}


def test_inspect_native_and_qr(tmp_path):
    net = DLRM_Net(8, [2, 17, 300, 1000], [5, 16, 8], [18, 4, 1], qr_flag=True, qr_operation="add",
                   qr_collisions=4)
    save_like_dlrm(net, tmp_path / "qr.pt")
    d = json.loads(run("inspect", tmp_path / "qr.pt", "--qr-op", "add", "--json").stdout)
    assert [t["representation"] for t in d["tables"]] == ["table", "table", "qr", "qr"]
    assert d["tables"][2]["bytes"] == (75 + 4) * 8 * 4 and d["tables"][2]["params"]["op"] == "add"
    rewrite.save(rewrite.load(tmp_path / "qr.pt", qr_op="add"), tmp_path / "qr.safetensors")
    n = json.loads(run("inspect", tmp_path / "qr.safetensors", "--json").stdout)
    assert n["format"] == "native" and n["provenance"]["format"] == "dlrm"
    assert n["tables"] == d["tables"] and n["embedding_bytes"] == d["embedding_bytes"]


def test_ambiguous_interaction_on_the_command_line(tmp_path):
    save_like_dlrm(DLRM_Net(2, [5, 9, 30], [5, 4, 2], [8, 1], arch_interaction_op="cat"), tmp_path / "m.pt")
    bad = run("inspect", tmp_path / "m.pt")
    assert bad.exit_code == 2 and "say which with --interaction" in bad.stderr
    ok = run("inspect", tmp_path / "m.pt", "--interaction", "cat", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["interaction"] == "cat"


def test_profile_json_and_output_file(day_files, tmp_path):
    out = tmp_path / "sub" / "profile.json"
    r = run("profile", day_files.model, "--data", day_files.data, "--sample-rate", "0.5",
            "--hot-bytes", "1KiB", "-o", out, "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["version"] == 1 and d["sample_rate"] == 0.5 and d["hot_bytes"] == 1024
    assert abs(d["samples"] - day_files.n_samples / 2) < 4 * np.sqrt(day_files.n_samples / 4)
    assert "counts" not in d                        # per-row counts go to the file only
    assert [t["name"] for t in d["tables"]] == ["t0", "t1", "t2", "t3"]
    for t in d["tables"]:
        assert t["lookups"] == d["samples"] and t["hot_rows_in_budget"] == min(t["rows"], 1024 // 16)
        assert 0 < t["top_1pct_coverage"] <= t["top_10pct_coverage"] <= 1
    saved = json.loads(out.read_text())
    assert saved["tables"] == d["tables"] and "counts" in saved
    prof = AccessProfile.load(out, rewrite.load(day_files.model))
    assert prof.samples == d["samples"]


def test_profile_human(day_files, tmp_path):
    r = run("profile", day_files.model, "--data", day_files.data, "-o", tmp_path / "p.json")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0] == f"{day_files.n_samples:,} samples from {day_files.data} (rate 1.0)"
    assert lines[1].split() == ["table", "rows", "touched", "top1%", "top10%", "zipf", "hot@90%"]
    assert [line.split()[0] for line in lines[2:6]] == ["t0", "t1", "t2", "t3"]
    assert lines[-1] == f"profile written to {tmp_path / 'p.json'}"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def bad_files(tmp_path, day_files):
    """name -> path of a file that must be refused."""
    files = {"missing": tmp_path / "absent.pt", "directory": tmp_path}
    (tmp_path / "notes.txt").write_text("not a model\n")
    files["text"] = tmp_path / "notes.txt"
    raw = day_files.model.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    files["truncated"] = tmp_path / "cut.pt"
    torch.save({"state_dict": {}, "x": _Payload(tmp_path / "ran")}, tmp_path / "evil.pt")
    files["code"] = tmp_path / "evil.pt"
    import pickle
    (tmp_path / "p4.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    files["plain pickle"] = tmp_path / "p4.pkl"
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    files["not dlrm"] = tmp_path / "linear.pt"
    sd = torch.load(day_files.model, weights_only=False)["state_dict"]
    sd.pop("top_l.0.bias")
    torch.save(sd, tmp_path / "nobias.pt")
    files["missing key"] = tmp_path / "nobias.pt"
    return files


MODEL_ERRORS = {
    "missing": "no such file", "directory": "a directory", "text": "not a torch.save file",
    "truncated": "truncated or corrupted", "code": "names code to run", "plain pickle": "refuses",
    "not dlrm": "not a recognised DLRM checkpoint", "missing key": "key 'top_l.0.bias' is missing",
}


def assert_one_line_error(r, *fragments):
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case", list(MODEL_ERRORS))
@pytest.mark.parametrize("command", ["inspect", "profile"])
def test_bad_model_file(case, command, bad_files, day_files, tmp_path):
    path = bad_files[case]
    extra = ["--data", day_files.data] if command == "profile" else []
    assert_one_line_error(run(command, path, *extra, "--json"), str(path), MODEL_ERRORS[case])
    assert not (tmp_path / "ran").exists()


def test_bad_data_and_options(day_files, tmp_path):
    m, d = day_files.model, day_files.data
    (tmp_path / "d.txt").write_text("1,2,3\n")
    np.savez(tmp_path / "cols.npz", X_int=np.zeros((4, 13)), y=np.zeros(4))
    np.savez(tmp_path / "few.npz", X_int=np.zeros((4, 13)), X_cat=np.zeros((4, 3), dtype=np.int32))
    np.savez(tmp_path / "ids.npz", X_int=np.zeros((4, 13)), X_cat=np.full((4, 4), 10**6, dtype=np.int32))
    cases = [
        (["--data", tmp_path / "absent.npz"], [str(tmp_path / "absent.npz"), "no such data file"]),
        (["--data", tmp_path / "d.txt"], [str(tmp_path / "d.txt"), "not Criteo TSV"]),
        (["--data", tmp_path / "cols.npz"], ["missing array(s) X_cat"]),
        (["--data", tmp_path / "few.npz"], ["3 categorical columns, the model takes 13 and 4"]),
        (["--data", tmp_path / "ids.npz"], ["feature 0 has ids outside table t0's range [0, 40)"]),
        (["--data", d, "--sample-rate", "0"], ["sample rate must be in (0, 1], got 0.0"]),
        (["--data", d, "--sample-rate", "1.5"], ["sample rate must be in (0, 1], got 1.5"]),
        (["--data", d, "--coverage", "0"], ["--coverage must be in (0, 1], got 0.0"]),
        (["--data", d, "--hot-bytes", "lots"], ["cannot read 'lots' as a byte size"]),
        (["--data", d, "-o", tmp_path / "notes.txt" / "p.json"], [str(tmp_path / "notes.txt")]),
    ]
    (tmp_path / "notes.txt").write_text("a file, so not a directory to write into\n")
    for args, fragments in cases:
        assert_one_line_error(run("profile", m, *args, "--json"), *fragments)


def test_usage_errors_exit_2_without_traceback(day_files):
    for args in (["profile", day_files.model], ["inspect", day_files.model, "--interaction", "dcn"],
                 ["profile", day_files.model, "--data", day_files.data, "--dense-transform", "sqrt"]):
        r = run(*args)
        assert r.exit_code == 2 and "Traceback" not in r.stderr and r.stdout == ""
        assert r.stderr.splitlines()[-1].startswith("Error: ")


def _subprocess(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "rewrite.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_real_process_streams(day_files, tmp_path):
    """In a real process: --json stdout is one JSON document, progress stays on stderr; an error
    is one stderr line; --debug shows the traceback."""
    ok = _subprocess("profile", day_files.model, "--data", day_files.data, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["samples"] == day_files.n_samples
    bad = _subprocess("inspect", tmp_path / "absent.pt")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'absent.pt'}: no such file or directory"]
    debug = _subprocess("--debug", "inspect", tmp_path / "absent.pt")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "RewriteError" in debug.stderr
