"""Shared fixtures: a synthetic hardware spec with round numbers, a small trained DLRM with
labelled held-out data, and two small but real lossy passes (registered only inside tests) so
selection has quality/memory trade-offs to make while the project's passes land elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from rewrite import data
from rewrite.cost.types import HardwareSpec, MemoryTier
from rewrite.core.embedding import TableBag
from rewrite.core.pass_contract import PASSES, PassInfo, Rewrite, Selection, Skip
from rewrite.core.synthetic import Synthetic, SyntheticConfig, write_npz
from rewrite.training import table_dlrm, train

ROWS = (3000, 800, 40, 6)


@pytest.fixture(autouse=True)
def _one_thread_and_tmp_cache(tmp_path_factory, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("DLRM_REWRITE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def synthetic_hw(**overrides) -> HardwareSpec:
    """cache: 4 KiB, 100 GB/s, 10 ns; dram: 1 GiB, 10 GB/s, 100 ns; fp32 GEMM 10 GFLOP/s flat;
    1 us per call."""
    kw = dict(name="synthetic", kind="cpu", cores=1, call_overhead=1e-6,
              tiers=(MemoryTier("cache", 4096, 100e9, 10e-9, 1.0, True),
                     MemoryTier("dram", 1 << 30, 10e9, 100e-9, 1.0)),
              gemm={"fp32": ((0.0, 10e9),)})
    kw.update(overrides)
    return HardwareSpec(**kw)


@dataclass(frozen=True)
class HalfConfig(Selection):
    dtype: str = "bfloat16"


def _half(site, cfg, ctx):
    """fp32 table -> the same table stored in bf16/fp16 (rounding error only)."""
    t = site.module(ctx.model)
    if not isinstance(t, TableBag) or t.weight.dtype != torch.float32:
        return Skip("not an fp32 table")
    return Rewrite(TableBag(t.rows, t.dim, t.pooling, cfg.dtype, t.weight.detach()))


@dataclass(frozen=True)
class SvdConfig(Selection):
    inner_dim: int = 4


def _svd(site, cfg, ctx):
    """fp32 table -> rank-k factorisation W ≈ (U_k S_k) V_kᵀ as an MDBag."""
    from passes.mixed_dim import MDBag

    t = site.module(ctx.model)
    if not isinstance(t, TableBag) or cfg.inner_dim >= t.dim:
        return Skip("not a table wider than inner_dim")
    u, s, vh = torch.linalg.svd(t.weight.detach().double(), full_matrices=False)
    rep = MDBag(t.rows, t.dim, cfg.inner_dim, t.pooling)
    rep.weight.data = (u[:, :cfg.inner_dim] * s[:cfg.inner_dim]).float()
    rep.proj.data = vh[:cfg.inner_dim].T.float().contiguous()
    return Rewrite(rep)


TEST_GRID = {"test-half": ("", "dtype=float16"), "test-svd": ("inner_dim=1", "inner_dim=4"),
             "onehot": ("",)}


@pytest.fixture
def test_passes(monkeypatch):
    """Register the two test passes for one test (removed afterwards)."""
    import passes  # noqa: F401

    monkeypatch.setitem(PASSES, "test-half", PassInfo("test-half", HalfConfig, _half))
    monkeypatch.setitem(PASSES, "test-svd", PassInfo("test-svd", SvdConfig, _svd))
    return TEST_GRID


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(model, held-out .npz path, model .pt path): a 4-table DLRM trained briefly on synthetic data."""
    from rewrite.formats import dlrm

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    gen = Synthetic(SyntheticConfig(rows=ROWS, n_pairs=4, seed=1))
    write_npz(root / "train.npz", *gen.sample(30000, seed=0))
    write_npz(root / "eval.npz", *gen.sample(6000, seed=1))
    model = table_dlrm(list(ROWS), dim=8, bottom=(16, 8), top=(16, 1), seed=0)
    train(model, data.open(root / "train.npz"), epochs=1, lr=1e-2, seed=0)
    dlrm.write(model, root / "model.pt", {})
    return model.eval(), root / "eval.npz", root / "model.pt"


def sample_of(npz, n=6000):
    return list(data.open(npz).batches(2048, limit=n))


def counts_with_hot_share(rows: int, hot: int, hot_share: float) -> np.ndarray:
    """Counts where the first ``hot`` rows take ``hot_share`` of all lookups."""
    c = np.empty(rows, dtype=np.int64)
    total = 100 * rows
    c[:hot] = int(total * hot_share / hot)
    c[hot:] = int(total * (1 - hot_share) / (rows - hot))
    return c
