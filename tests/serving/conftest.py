"""A small served bundle (every CPU path the tests can build here) and live servers on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest

from rewrite.bundling import compile_model
from rewrite.core.model_file import save
from rewrite.core.synthetic import multi_hot_batch
from rewrite.training import table_dlrm
from targets.base import get_target

ROWS = [3, 50, 400, 1000]
N_DENSE = 5
MODEL = "tiny"


def serving_targets() -> list[str]:
    names = ["onnx-cpu", "torch", "tvm-llvm"]
    return [n for n in names if get_target(n).unavailable() is None]


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    model = table_dlrm(ROWS, n_dense=N_DENSE, dim=8, bottom=(16, 8), top=(16, 1), seed=3).eval()
    save(model, root / "model.safetensors")
    compile_model(model, root / MODEL, serving_targets(), source=root / "model.safetensors",
                  latency_sizes=(1, 64))
    return root / MODEL


def ragged(batch: int, seed: int, mean_len: float = 2.0):
    """A canonical batch (numpy) with multi-hot and empty bags."""
    b = multi_hot_batch(ROWS, batch, N_DENSE, mean_len, seed, empty_fraction=0.2)
    return b.dense.numpy(), b.indices.numpy(), b.offsets.numpy()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
