import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rewrite.runtime as runtime
from rewrite.core.errors import RewriteError
from rewrite.core.synthetic import multi_hot_batch
from tests.bundles import make_bundle
from tests.representations import composite_model
from tests.tolerances import assert_close, path_tolerance

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("runtime"))[1]


@pytest.fixture(scope="module")
def pred(bundle):
    return runtime.load(bundle, threads=1)


@pytest.fixture(scope="module")
def model():
    return composite_model()


def rows(model):
    return [model.embeddings[t].rows for t in model.feature_tables]


@pytest.mark.parametrize("size", [1, 1024])
@pytest.mark.parametrize("path", ["onnx-cpu", "torch", None])
def test_predict_is_sigmoid_of_the_reference(pred, model, path, size):
    b = multi_hot_batch(rows(model), size, 5, 3.0, size, empty_fraction=0.2)
    want = torch.sigmoid(model(*b.inputs())).detach().numpy()
    got = pred.predict(b.dense.numpy(), b.indices.numpy(), b.offsets.numpy(), path=path)
    assert got.dtype == np.float32 and got.shape == (size,)
    np.testing.assert_allclose(got, want, atol=path_tolerance("fp32")[0])


def test_torch_tensors_and_int32_ids_are_accepted(pred, model):
    b = multi_hot_batch(rows(model), 3, 5, 2.0, 0)
    got = pred.predict(b.dense, b.indices.to(torch.int32), b.offsets.to(torch.int32))
    assert_close(got, torch.sigmoid(model(*b.inputs())), "probability", "int32 ids")


def test_dispatch_follows_the_policy(pred, monkeypatch):
    ranges = [{"min_batch": 1, "max_batch": 4, "path": "torch"},
              {"min_batch": 5, "max_batch": None, "path": "onnx-cpu"}]
    monkeypatch.setitem(pred.bundle.manifest["dispatch"], "ranges", ranges)
    assert [pred.bundle.path_for_batch(b) for b in (1, 4, 5, 100000)] == ["torch", "torch", "onnx-cpu", "onnx-cpu"]
    used = []
    for name in ("torch", "onnx-cpu"):
        real = pred.runner(name)
        monkeypatch.setitem(pred._runners, name, lambda d, bags, n=name, r=real: used.append(n) or r(d, bags))
    for size in (2, 9):
        b = multi_hot_batch(pred.bundle.table_rows(), size, 5, 1.0, size)
        pred.predict(b.dense, b.indices, b.offsets)
    assert used == ["torch", "onnx-cpu"]


def test_empty_batch(pred):
    out = pred.predict(np.zeros((0, 5), np.float32), np.zeros(0, np.int64), np.zeros(1, np.int64))
    assert out.shape == (0,) and out.dtype == np.float32


def _bad(model):
    b = multi_hot_batch(rows(model), 4, 5, 2.0, 0, empty_fraction=0.0)
    return b.dense.numpy(), b.indices.numpy().copy(), b.offsets.numpy().copy()


@pytest.mark.parametrize("edit, message", [
    (lambda d, i, o: (d, i, o[:-1]), lambda f: rf"offsets must have F\*B\+1 = {4 * f + 1} entries \(F={f}, B=4\), got {4 * f}"),
    (lambda d, i, o: (d, i, np.concatenate([o[:3], o[2:3] - 1, o[4:]])), "offsets decrease at position 3"),
    (lambda d, i, o: (d, i, o + 1), "offsets must start at 0 and end at len"),
    (lambda d, i, o: (d, np.where(np.arange(len(i)) == 0, -1, i), o), r"feature 0 has id -1 outside .*\[0, 97\)"),
    (lambda d, i, o: (d, np.where(np.arange(len(i)) == len(i) - 1, 97, i), o), lambda f: rf"feature {f - 1} has id 97 outside"),
    (lambda d, i, o: (d[:, :4], i, o), r"dense must be floating point \[B, 5\]"),
    (lambda d, i, o: (d, i.astype(np.float32), o), "indices must be a 1-D int32 or int64 array"),
])
def test_bad_inputs_are_rejected_with_the_reason(pred, model, edit, message):
    """(the last feature reads the first table, which has 97 rows)"""
    if callable(message):
        message = message(len(model.spec.features))
    with pytest.raises(RewriteError, match=message):
        pred.predict(*edit(*_bad(model)))


def test_unknown_or_failed_path_is_refused(pred, monkeypatch):
    with pytest.raises(RewriteError, match=r"no path 'tvm' \(paths: onnx-cpu, torch\)"):
        pred.runner("tvm")
    failed = dict(pred.bundle.paths["torch"], verification={"passed": False, "failure": "max |dp| 1 > 1e-5"})
    monkeypatch.setitem(pred.bundle.manifest["paths"], "torch", failed)
    monkeypatch.setattr(pred, "_runners", {})
    with pytest.raises(RewriteError, match=r"path 'torch' failed verification at compile time \(max"):
        pred.runner("torch")


def test_runtime_imports_no_compiler_side(bundle):
    """A server that loads a bundle imports onnxruntime/torch, not exporters, quantizers or readers."""
    code = f"""
import sys, json, numpy as np
import rewrite.runtime
pred = rewrite.runtime.load({str(bundle)!r})
rows = pred.bundle.table_rows()
idx = np.array([r - 1 for r in rows], dtype=np.int64)
p = pred.predict(np.zeros((1, 5), np.float32), idx, np.arange(len(rows) + 1), path="onnx-cpu")
print(json.dumps(sorted(sys.modules)))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    mods = set(json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                         capture_output=True, text=True).stdout.splitlines()[-1]))
    assert "onnxruntime" in mods
    forbidden = ["onnx", "onnxscript", "onnx_ir", "torch.onnx", "onnxruntime.quantization", "torch._inductor",
                 "rewrite.bundling", "rewrite.formats", "rewrite.profiling", "rewrite.core.tracing",
                 "rewrite.data", "rewrite.verification", "rewrite.bench", "passes", "fbgemm_gpu"]
    assert [m for m in forbidden if m in mods] == []
