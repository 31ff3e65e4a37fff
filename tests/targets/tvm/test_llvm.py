"""tvm-llvm: one compile of the composite model, then numerics against torch and the error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rewrite.core.errors import RewriteError
from targets.base import CompiledPath, get_target
from rewrite.core.batch import split_bags_np
from targets.tvm.common import LIBRARY, PARAMS, aligned_copies
from targets.tvm.llvm import host_cpu
from tests.targets.tvm.models import BATCHES, batch, composite_model
from tests.tolerances import assert_close, tolerance

pytestmark = pytest.mark.slow   # one Relax compile (~15-40 s on 2 shared cores)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return composite_model()


@pytest.fixture(scope="module")
def compiled(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tvm_llvm")
    path = get_target("tvm-llvm").lower(model, batch(model, "b1-ragged"), out)
    return out, path


@pytest.fixture(scope="module")
def runner(compiled):
    out, path = compiled
    return get_target("tvm-llvm").load(out, path)


def run(runner, model, b):
    bags = split_bags_np(b.indices.numpy(), b.offsets.numpy(), len(model.spec.features))
    return runner(b.dense.numpy(), bags)


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_matches_torch_on_every_representation(model, runner, name):
    b = batch(model, name)
    with torch.no_grad():
        ref = model(*b.inputs()).numpy()
    out = run(runner, model, b)
    assert out.dtype == np.float32 and out.shape == (b.size,)
    assert_close(out, ref, "compiled-fp32-logits", name)


def test_every_table_reaches_the_logits(model):
    """Guards the composite test: zeroing any one table moves the logits well beyond tolerance."""
    b = batch(model, "b1024-ragged")
    tol = tolerance("compiled-fp32-logits")
    with torch.no_grad():
        ref = model(*b.inputs())
        bound = tol.atol + tol.rtol * ref.abs().max().item()     # the widest |Δlogit| the test allows
        for name, rep in model.embeddings.items():
            saved = {k: v.clone() for k, v in rep.state_dict().items()}
            for p in rep.parameters():
                p.zero_()
            moved = (model(*b.inputs()) - ref).abs().max().item()
            rep.load_state_dict(saved)
            assert moved > 100 * bound, f"table {name} barely affects the logits ({moved})"


def test_path_folder_holds_library_and_typed_params(model, compiled):
    out, path = compiled
    assert path.target == "tvm-llvm" and path.files == [LIBRARY, PARAMS]
    assert path.options["mcpu"] == host_cpu() and path.options["mcpu"] not in ("native", "generic")
    with safe_open(str(out / PARAMS), framework="pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["order"]) == path.options["params"]
        dtypes = {k: f.get_tensor(k).dtype for k in keys}
    table_params = {k: v for k, v in dtypes.items() if "embeddings" in k}
    assert len(table_params) == sum(len(list(r.parameters())) for r in model.embeddings.values())
    assert dtypes[next(k for k in keys if "embeddings_fp16" in k)] == torch.float16
    assert dtypes[next(k for k in keys if "embeddings_bf16_mean" in k)] == torch.bfloat16
    # parameters are inputs, not constants linked into the library
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (out / LIBRARY).stat().st_size < param_bytes


def test_runner_rejects_a_wrong_number_of_bag_arrays(model, runner):
    b = batch(model, "b1-ragged")
    bags = split_bags_np(b.indices.numpy(), b.offsets.numpy(), len(model.spec.features))
    with pytest.raises(RewriteError, match="expected 18 bag arrays, got 16"):
        runner(b.dense.numpy(), bags[:-2])


def test_load_refuses_missing_files(compiled, tmp_path):
    out, path = compiled
    with pytest.raises(RewriteError, match="missing compiled library"):
        get_target("tvm-llvm").load(tmp_path, path)
    (tmp_path / LIBRARY).write_bytes((out / LIBRARY).read_bytes())
    (tmp_path / PARAMS).write_bytes((out / PARAMS).read_bytes())
    renamed = CompiledPath(path.target, path.files, {**path.options,
                                                     "params": path.options["params"] + ["p_gone"]})
    with pytest.raises(RewriteError, match="missing parameter.*p_gone"):
        get_target("tvm-llvm").load(tmp_path, renamed)


def test_unknown_option_is_refused(model, tmp_path):
    with pytest.raises(RewriteError, match="tvm-llvm: unknown option.*arch"):
        get_target("tvm-llvm").lower(model, batch(model, "b1-ragged"), tmp_path, arch="sm_80")


def test_available_here():
    assert get_target("tvm-llvm").unavailable() is None


def test_aligned_copies_are_64_byte_aligned_equal_copies():
    arrays = [np.arange(13, dtype=np.float32).reshape(1, 13), np.arange(3), np.arange(0),
              np.arange(5)]
    copies = aligned_copies(arrays)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)
        assert c.size == 0 or c.ctypes.data % 64 == 0


@pytest.mark.slow
def test_every_fitted_representation_matches_eager(tmp_path):
    """The shared list of every representation (each pass's real output) through tvm-llvm."""
    from tests.representations import REPRESENTATIONS
    from tests.representations import composite_model as every_representation
    from tests.targets.checks import assert_matches_eager, lower_and_load

    model = every_representation()
    assert {name for name, _ in REPRESENTATIONS} <= {t.split("_", 1)[1] for t in model.embeddings}
    _, runner = lower_and_load(get_target("tvm-llvm"), model, tmp_path)
    assert_matches_eager(runner, model, "fp32")
