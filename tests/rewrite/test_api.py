"""`rewrite compile MODEL -p PASS ...`: the apply gate, then a bundle of the rewritten model with
the original as reference; exit codes 0/1/2 and nothing written on 1 or 2; format-1 bundles load."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import rewrite.runtime
from rewrite.artifact import MANIFEST, open_bundle
from rewrite.cli import main
from rewrite.core.model_file import load
from rewrite.core.synthetic import multi_hot_batch
from tests.pass_helpers import model_and_day
from tests.tolerances import assert_close

torch.set_num_threads(1)
ROWS = (3, 40, 257, 1000)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return model_and_day(tmp_path_factory.mktemp("compile-p"), ROWS)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    r = run("compile", files / "model.pt", "-p", "qr:tables=t3", "-p", "quantize:bits=8", "--data",
            files / "day.npz", "--target", "onnx-cpu", "--target", "torch", "-o", out, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    return out, json.loads(r.stdout)


def test_passes_then_compile(files, bundle):
    out, printed = bundle
    b = open_bundle(out)
    m = b.manifest
    assert m["passes"] == ["qr:tables=t3", "quantize"]          # str() omits defaults (bits=8)
    assert m["rewrite"]["within_tolerance"] and m["rewrite"]["verification_data"] == str(files / "day.npz")
    original, rewritten = load(out / m["reference"]["path"]), load(out / m["rewritten"]["path"])
    assert m["reference"]["sha256"] != m["rewritten"]["sha256"]
    reps = {t: r.describe() for t, r in rewritten.embeddings.items()}
    assert reps != {t: r.describe() for t, r in original.embeddings.items()}
    assert rewritten.embeddings["t3"].kind == "qr" and rewritten.embeddings["t2"].kind == "rowwise" and rewritten.embedding_bytes() < original.embedding_bytes()
    for name in ("onnx-cpu", "torch"):
        assert b.paths[name]["representations"] == reps and b.paths[name]["verification"]["passed"]
        assert b.paths[name]["lowered_from"] == m["rewritten"]["path"]
    assert set(printed["paths"]) == {"onnx-cpu", "torch"}
    batch = multi_hot_batch(list(ROWS), 64, 13, 2.0, seed=3)
    with torch.no_grad():
        want = rewritten(*batch.inputs()).numpy()
    got = rewrite.runtime.load(out).logits(*batch.inputs(), path="onnx-cpu")
    assert_close(got, want, "compiled-fp32-logits", "onnx-cpu")


def test_format_1_bundle_still_loads(bundle, tmp_path):
    import shutil

    out = tmp_path / "old"
    shutil.copytree(bundle[0], out)
    m = json.loads((out / MANIFEST).read_text())
    m["format_version"] = 1
    for key in ("passes", "rewrite"):
        m.pop(key)
    (out / MANIFEST).write_text(json.dumps(m))
    assert open_bundle(out).default_path in ("onnx-cpu", "torch")


def test_exceeded_tolerance_is_exit_1_and_writes_nothing(files, tmp_path):
    out = tmp_path / "b"
    r = run("compile", files / "model.pt", "-p", "hash:max_error=0.01", "--data", files / "day.npz",
            "--target", "torch", "-o", out)
    assert r.exit_code == 1, r.output + r.stderr
    assert "exceed" in r.stderr and "no bundle written" in r.stderr and "nothing written" in r.output
    assert not out.exists()
    r = run("compile", files / "model.pt", "-p", "hash:max_error=0.01", "--allow-degraded",
            "--target", "torch", "-o", out)
    assert r.exit_code == 0, r.output + r.stderr
    assert open_bundle(out).manifest["rewrite"]["within_tolerance"] is False


@pytest.mark.parametrize("args, message", [
    (["-p", "nope"], "error: unknown pass 'nope'"),
    (["-p", "quantize:bits=3"], "error: pass quantize: option bits='3': must be one of 16, 8, 4, 2"),
    (["-p", "quantize", "--target", "nope"], "unknown target"),
    (["--data", "day.npz"], "error: --data, --profile and --allow-degraded need -p or --plan"),
    (["-p", "quantize", "--data", "missing.npz"], "missing.npz"),
])
def test_bad_input_is_exit_2_and_writes_nothing(files, tmp_path, args, message):
    out = tmp_path / "b"
    r = run("compile", files / "model.pt", *args, "--target", "torch", "-o", out) if "--target" not in args \
        else run("compile", files / "model.pt", *args, "-o", out)
    assert r.exit_code == 2, r.output + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_existing_output_is_refused_before_the_passes(files, bundle):
    r = run("compile", files / "model.pt", "-p", "nope:x=1", "--target", "torch", "-o", bundle[0])
    assert r.exit_code == 2
    r = run("compile", files / "model.pt", "-p", "quantize", "--target", "torch", "-o", bundle[0])
    assert r.exit_code == 2 and "already exists (use --force to replace it)" in r.stderr
