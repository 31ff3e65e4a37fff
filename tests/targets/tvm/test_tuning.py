"""tvm-llvm tuning: one tiny tuned compile (2 trials), numerics of the tuned library against
torch, the recorded options, the task filter, and every refusal."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rewrite.cli import main
from rewrite.bundling import resolve_targets, tune_options
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.model_file import save
from rewrite.core.model import ModelSpec, RecModel
from rewrite.core.synthetic import multi_hot_batch
from targets.base import CompiledPath, get_target
from rewrite.core.batch import split_bags_np
from targets.tvm.common import LIBRARY, PARAMS
from targets.tvm.tuning import TUNE_EXTRA, check_options, tuned_library
from tests.tolerances import assert_close

TUNED_B, TRIALS = 64, 2
ROWS = (300, 50)


def tiny_model() -> RecModel:
    spec = ModelSpec(n_dense=13, bottom=(16, 8), top=(16, 1), features=(("f_a", "a"), ("f_b", "b")))
    torch.manual_seed(0)
    model = RecModel(spec, {"a": TableBag(ROWS[0], 8), "b": TableBag(ROWS[1], 8)}).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return model


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model()


@pytest.fixture(scope="module")
def tuned(model, tmp_path_factory):
    for extra in TUNE_EXTRA:
        pytest.importorskip(extra, reason="tuning needs the tune extra")
    out = tmp_path_factory.mktemp("tvm_tune")
    example = multi_hot_batch(list(ROWS), 8, 13, 2.0, seed=1)
    path = get_target("tvm-llvm").lower(model, example, out, tune_trials=TRIALS,
                                        tune_batches=(TUNED_B,))
    return out, path


def run(runner, b):
    return runner(b.dense.numpy(), split_bags_np(b.indices.numpy(), b.offsets.numpy(), 2))


@pytest.mark.slow   # ~1-2 min: meta-schedule builds and times 2 candidates on 2 shared cores
@pytest.mark.parametrize("size, empty", [(TUNED_B, 0.2), (TUNED_B, 1.0), (1, 0.0), (TUNED_B + 1, 0.2)])
def test_tuned_path_matches_torch(model, tuned, size, empty):
    """Batches of TUNED_B run the tuned library (ragged, all-empty, largest ids); others the
    dynamic one."""
    out, path = tuned
    runner = get_target("tvm-llvm").load(out, path, threads=1)
    b = multi_hot_batch(list(ROWS), size, 13, 2.0, seed=size, empty_fraction=empty)
    assert empty == 1.0 or int(b.indices.max()) == ROWS[0] - 1
    with torch.no_grad():
        ref = model(*b.inputs()).numpy()
    assert_close(run(runner, b), ref, "compiled-fp32-logits", f"B={size} empty={empty}")


@pytest.mark.slow
def test_options_recorded(tuned):
    out, path = tuned
    o = path.options
    assert path.files == [LIBRARY, PARAMS, tuned_library(TUNED_B)]
    assert (out / tuned_library(TUNED_B)).is_file()
    assert o["tune_trials"] == TRIALS and o["tune_batches"] == [TUNED_B]
    assert 0 < o["tune_seconds"] < 600
    names = o["tuned_tasks"][str(TUNED_B)]
    assert names and all("matmul" in n for n in names)          # lookups never measured
    speed = o["tune_speedup"][str(TUNED_B)]
    assert speed["untuned_ms"] > 0 and speed["tuned_ms"] > 0
    rounding = 5e-4 / speed["untuned_ms"] + 5e-4 / speed["tuned_ms"]   # ms kept to 3 decimals
    assert speed["speedup"] == pytest.approx(speed["untuned_ms"] / speed["tuned_ms"], rel=0.01 + rounding)


@pytest.mark.slow
def test_runner_dispatches_by_batch_size(model, tuned, tmp_path):
    """Mapping the static 64-sample library to 65 samples must fail: the runner really calls it."""
    out, path = tuned
    for f in path.files:
        shutil.copy(out / f, tmp_path / f)
    wrong = CompiledPath(path.target, path.files,
                         {**path.options, "tuned_libraries": {str(TUNED_B + 1): tuned_library(TUNED_B)}})
    runner = get_target("tvm-llvm").load(tmp_path, wrong, threads=1)
    with pytest.raises(Exception):
        run(runner, multi_hot_batch(list(ROWS), TUNED_B + 1, 13, 2.0, seed=0))
    (tmp_path / tuned_library(TUNED_B)).unlink()
    with pytest.raises(RewriteError, match="missing tuned library"):
        get_target("tvm-llvm").load(tmp_path, path)


def test_tuning_without_the_extra_is_refused(monkeypatch):
    import targets.tvm.tuning as tvm_tuning

    monkeypatch.setattr(tvm_tuning, "TUNE_EXTRA", ("xgboost", "no_such_module_here"))
    with pytest.raises(RewriteError, match="tvm-llvm: tuning needs no_such_module_here "
                                           "\\(pip install 'dlrm-rewrite\\[tune\\]'\\)"):
        check_options({"tune_trials": 8}, "tvm-llvm")


def test_tuning_options_are_checked():
    if any(importlib.util.find_spec(m) is None for m in TUNE_EXTRA):
        pytest.skip("the tune extra is not installed")
    assert check_options({}, "tvm-llvm") == (0, ())
    assert check_options({"tune_trials": 8}, "tvm-llvm") == (8, (512, 2048))
    assert check_options({"tune_trials": 8, "tune_batches": (64, 8, 64)}, "tvm-llvm") == (8, (8, 64))
    with pytest.raises(RewriteError, match="tvm-llvm: option tune_trials must be a positive integer, got 0"):
        check_options({"tune_trials": 0}, "tvm-llvm")
    with pytest.raises(RewriteError, match="option tune_batches must be positive batch sizes"):
        check_options({"tune_trials": 8, "tune_batches": (0,)}, "tvm-llvm")
    with pytest.raises(RewriteError, match="option tune_batches needs tune_trials > 0"):
        check_options({"tune_batches": (64,)}, "tvm-llvm")


def test_tuning_is_refused_by_tvm_cuda(model, tmp_path):
    with pytest.raises(RewriteError, match="tvm-cuda: tuning \\(tune_trials\\) is not supported"):
        get_target("tvm-cuda").lower(model, None, tmp_path, tune_trials=4)


def test_tune_flag_needs_a_tuning_target(model, tmp_path):
    with pytest.raises(RewriteError, match="--tune: target\\(s\\) onnx-cpu, torch do not support tuning"):
        tune_options(resolve_targets(["onnx-cpu", "torch"]), 4)
    assert tune_options(resolve_targets(["onnx-cpu", "tvm-llvm"]), 4) == {"tvm-llvm": {"tune_trials": 4}}
    src = tmp_path / "m.safetensors"
    save(model, src)
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "b"),
                                  "--target", "onnx-cpu", "--tune", "4"])
    assert r.exit_code == 2
    assert r.stderr == "error: --tune: target(s) onnx-cpu do not support tuning (tvm-llvm does)\n"
    assert not (tmp_path / "b").exists()
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "b"),
                                  "--target", "tvm-llvm", "--tune", "0"])
    assert r.exit_code == 2 and "--tune" in r.stderr
