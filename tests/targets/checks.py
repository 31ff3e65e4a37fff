"""Shared checks for the targets: lowered path vs torch eager of the same model, and the int8
row quantization every int8 kernel is held to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rewrite.core.model import RecModel
from rewrite.core.synthetic import multi_hot_batch
from targets.base import Target
from rewrite.core.batch import split_bags_np
from tests.tolerances import path_tolerance

BATCHES = ((1, 3.0, 0.2), (2, 3.0, 0.0), (1024, 3.0, 0.2), (1536, 1.0, 0.05), (6, 0.0, 1.0))
# (batch size, mean bag length, fraction of empty bags): ragged at 1 and >= 1024; all-empty


def ref_quantize(x: torch.Tensor, kp: int):
    """Per-row symmetric int8, round half away from zero, zero padding to kp columns."""
    s = x.abs().amax(1) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    v = x / s[:, None]
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)
    return torch.nn.functional.pad(q, (0, kp - x.shape[1])), s


def ref_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 of W [N, K], written for the tests: scale = max|W row| / 127
    (an all-zero row: the smallest normal float, any positive scale gives codes 0), codes
    round(W / scale) half to even (torch.round) clamped to ±127, K zero-padded to a multiple of 8.
    Returns (codes int8 [N, Kp], scale fp32 [N])."""
    w = w.detach().to(torch.float32)
    n, k = w.shape
    scale = w.abs().amax(1) / 127.0
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(torch.float32).tiny))
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return torch.nn.functional.pad(codes, (0, -(-k // 8) * 8 - k)), scale


def test_batches(model: RecModel, seed: int = 0):
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    return [multi_hot_batch(rows, b, model.spec.n_dense, mean, seed + i, empty_fraction=empty)
            for i, (b, mean, empty) in enumerate(BATCHES)]


def example_batch(model: RecModel):
    """The example batch targets are lowered with in these tests."""
    return multi_hot_batch([model.embeddings[t].rows for t in model.feature_tables], 8,
                           model.spec.n_dense, 2.0, seed=99)


def lower_and_load(target: Target, model: RecModel, out: Path, **options):
    out.mkdir(parents=True, exist_ok=True)
    compiled = target.lower(model, example_batch(model), out, **options)
    return compiled, target.load(out, compiled, threads=1)


@torch.inference_mode()
def assert_matches_eager(runner, model: RecModel, precision: str) -> float:
    """Runner agrees with eager on ragged / empty / largest-id batches; returns the worst |Δlogit|."""
    atol, rtol = path_tolerance(precision)
    n_features = len(model.spec.features)
    worst = 0.0
    for batch in test_batches(model):
        rows = [model.embeddings[t].rows for t in model.feature_tables]
        for f, ids in enumerate(batch.feature_ids(n_features)):
            if ids.numel():
                assert int(ids.max()) == rows[f] - 1      # the largest id is exercised
        ref = model(*batch.inputs()).numpy()
        got = runner(batch.dense.numpy(), split_bags_np(batch.indices.numpy(), batch.offsets.numpy(), n_features))
        assert got.shape == ref.shape == (batch.size,)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=atol, rtol=rtol, err_msg=f"batch {batch.size}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def ref_int8_mlp(net: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The int8 MLP kernels' math (VnniMlp, Avx2Int8Mlp) in int64 / f32 torch ops: s8 (+128) for signed inputs, u8 after a ReLU;
    a width-1 last layer without ReLU is an fp32 dot product."""
    mods = list(net)
    layers = [(m, k + 1 < len(mods) and isinstance(mods[k + 1], torch.nn.ReLU))
              for k, m in enumerate(mods) if isinstance(m, torch.nn.Linear)]
    last = layers.pop()[0] if layers[-1][0].out_features == 1 and not layers[-1][1] else None
    h, signed = x, True
    for lin, relu in layers:
        codes, scale = ref_quantize_weight(lin.weight)                  # [N, Kp], [N]
        if signed:
            a, s = ref_quantize(h, codes.shape[1])
        else:
            s = h.amax(1) / 255
            s = torch.where(s > 0, s, torch.ones_like(s))
            a = torch.floor(h / s[:, None] + 0.5).clamp(0, 255)
        acc = a.long() @ codes.long().t()                                # exact, as VPDPBUSD
        h = acc.float() * (s[:, None] * scale[None]) + lin.bias.detach()
        h, signed = (h.relu(), False) if relu else (h, True)
    return h @ last.weight.detach().t() + last.bias.detach() if last is not None else h
