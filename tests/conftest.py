"""Shared fixtures: small random table DLRMs, ragged batches, a small synthetic day on disk.

Every test runs on one thread (the machine is shared; results must not depend on threading).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rewrite.core import isa
from rewrite.core.batch import Batch
from rewrite.formats import dlrm
from rewrite.core.model import RecModel
from rewrite.core.synthetic import Synthetic, SyntheticConfig, multi_hot_batch, write_npz
from rewrite.training import table_dlrm

torch.set_num_threads(1)

# A 2-row table, tables below and above dlrm's 200-row QR/MD threshold, a 1000-row one.
ROWS = (2, 17, 300, 1000)
N_DENSE = 5
DIM = 8


@pytest.fixture(params=isa.TIERS)
def isa_tier(request, monkeypatch) -> str:
    """Each ISA tier in turn (``REWRITE_ISA`` set for the test), so the kernels of every tier this
    host can run are tested here, the lower ones forced; a tier above the host skips by name."""
    try:
        isa.check_tier(request.param)
    except Exception as e:
        pytest.skip(str(e))
    cap = isa.process_cap()
    if cap and isa.rank(request.param) > isa.rank(cap):
        pytest.skip(f"ISA tier {request.param!r}: this process started with {isa.ENV}={cap}, which caps "
                    f"torch's and oneDNN's kernels for its whole life")
    monkeypatch.setenv(isa.ENV, request.param)
    return request.param


@pytest.fixture
def make_dlrm():
    """``make_dlrm(rows=ROWS, dim=DIM, seed=0) -> RecModel``: a random dot-interaction table DLRM."""

    def make(rows=ROWS, dim: int = DIM, seed: int = 0, n_dense: int = N_DENSE) -> RecModel:
        return table_dlrm(list(rows), n_dense=n_dense, dim=dim, bottom=(16, dim), top=(16, 8, 1),
                          seed=seed).eval()

    return make


@pytest.fixture
def make_batch():
    """``make_batch(rows=ROWS, batch=32, mean_len=2.0, seed=0, empty_fraction=0.2) -> Batch``:
    multi-hot bags of Poisson lengths, some empty, each table's largest id present."""

    def make(rows=ROWS, batch: int = 32, mean_len: float = 2.0, seed: int = 0,
             empty_fraction: float = 0.2, n_dense: int = N_DENSE) -> Batch:
        return multi_hot_batch(list(rows), batch, n_dense, mean_len, seed, empty_fraction)

    return make


@pytest.fixture
def small_dlrm(make_dlrm) -> RecModel:
    return make_dlrm()


@pytest.fixture
def ragged_batch(make_batch) -> Batch:
    return make_batch()


@dataclass(frozen=True)
class DayFiles:
    """A trained-shape DLRM in dlrm's checkpoint format and a synthetic day that matches it."""

    model: Path
    data: Path
    rows: tuple[int, ...]
    n_samples: int


SYNTH_ROWS = (40, 300, 5, 2000)
SYNTH_SAMPLES = 4000


@pytest.fixture(scope="session")
def day_files(tmp_path_factory) -> DayFiles:
    out = tmp_path_factory.mktemp("day")
    gen = Synthetic(SyntheticConfig(rows=SYNTH_ROWS, n_pairs=4, seed=3))
    write_npz(out / "day_0.npz", *gen.sample(SYNTH_SAMPLES, seed=0))
    model = table_dlrm(list(SYNTH_ROWS), n_dense=13, dim=4, bottom=(8, 4), top=(8, 1), seed=1)
    dlrm.write(model, out / "model.pt", {"nepochs": 1, "test_auc": 0.75, "iter": 10})
    return DayFiles(out / "model.pt", out / "day_0.npz", SYNTH_ROWS, SYNTH_SAMPLES)
