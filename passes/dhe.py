"""Deep Hash Embedding (Kang et al., KDD'21): a table replaced by hashing + an MLP.

Before: W [rows, d], e(bag) = Σ_{x in bag} W[x].
After:  code(x) = T(h_1(x), ..., h_k(x))   k universal hashes into [0, m) (``passes.universal_hash``),
        T uniform: h · 2/(m−1) − 1 ∈ [−1, 1];  T gaussian: Box–Muller on pairs,
              u = (h + ½)/m,  (√(−2 ln u_1) cos 2πu_2, √(−2 ln u_1) sin 2πu_2)
        e(x) = L_n(Mish(... Mish(L_1(code(x)))))      Mish(z) = z · tanh(softplus(z))
        e(bag) = Σ_{x in bag} e(x)
Fit: frequency-weighted regression of the trained rows with Linear → BatchNorm → Mish hidden
layers (the paper's decoder); the batch-norms are folded into the linears afterwards, so the
stored module is Linear + Mish only:  W' = diag(γ/σ) W,  b' = γ (b − μ)/σ + β.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from passes.universal_hash import hash_coefficients, hash_ops, universal_hash
from passes.rowfit import (FitOptions, budget_bytes, fit_rows, fit_steps, fp32_table, not_smaller, over_budget,
                           rms, table_rows, target_compression, weighted_rel_error)
from rewrite.core.embedding import Representation, pool, register_representation
from rewrite.core.pass_contract import PassContext, Rewrite, Skip, option, register_pass
from rewrite.core.tracing import EmbeddingSite

MAX_BUCKETS = 1 << 24          # bucket numbers must be exact in float32 (24-bit mantissa)
MISH_FLOPS = 7                 # abs, neg, exp, add, log, add (softplus), tanh, mul: ~7 per unit
TRANSFORM_FLOPS = {"uniform": 2, "gaussian": 8}   # per code element
MIN_HIDDEN = 4                 # the smallest planned decoder: k = 8, hidden 4-2
PAPER_K, PAPER_HIDDEN = 1024, (512, 256)   # Kang et al.'s decoder: the shape when only one of k / hidden is given


def mish(z: torch.Tensor) -> torch.Tensor:
    """z · tanh(softplus(z)), softplus written max(z,0) + log(1 + e^−|z|) (stable, elementwise)."""
    return z * torch.tanh(torch.relu(z) + torch.log(1 + torch.exp(-torch.abs(z))))


class DeepHashDecoder(nn.Module):
    """ids [n] -> [n, dim]: hash code, then Linear + Mish layers, then a last Linear."""

    def __init__(self, dim: int, k: int, buckets: int, hidden: tuple[int, ...], transform: str,
                 seed: int):
        super().__init__()
        if transform not in TRANSFORM_FLOPS:
            raise ValueError(f"transform must be uniform or gaussian, got {transform!r}")
        if transform == "gaussian" and k % 2:
            raise ValueError(f"the gaussian transform pairs hashes: k must be even, got {k}")
        if not 2 <= buckets <= MAX_BUCKETS:
            raise ValueError(f"buckets must be in [2, 2^24] (exact in float32), got {buckets}")
        self.k, self.buckets, self.transform = int(k), int(buckets), transform
        self.hidden = tuple(int(h) for h in hidden)
        a, b = hash_coefficients(self.k, seed)
        self.register_buffer("hash_a", a)
        self.register_buffer("hash_b", b)
        widths = [self.k, *self.hidden, dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        h = universal_hash(ids, self.hash_a, self.hash_b, self.buckets).to(torch.float32)
        if self.transform == "uniform":
            return h * (2.0 / (self.buckets - 1)) - 1.0
        u = ((h + 0.5) / self.buckets).reshape(-1, self.k // 2, 2)
        radius = torch.sqrt(-2.0 * torch.log(u[:, :, 0]))
        angle = (2 * math.pi) * u[:, :, 1]
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.encode(ids)
        for layer in self.layers[:-1]:
            x = mish(layer(x))
        return self.layers[-1](x)

    def flops(self) -> float:
        mlp = sum(2 * l.in_features * l.out_features + l.out_features for l in self.layers)
        return float(hash_ops(self.k) + TRANSFORM_FLOPS[self.transform] * self.k
                     + mlp + MISH_FLOPS * sum(self.hidden))

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.layers.parameters())


def decoder_bytes(dim: int, k: int, hidden: tuple[int, ...]) -> int:
    """Stored bytes of a decoder: fp32 weights and biases + int64 (a, b) per hash."""
    widths = [k, *hidden, dim]
    return 4 * sum(i * o + o for i, o in zip(widths[:-1], widths[1:])) + 16 * k


def plan_decoder(dim: int, budget: int) -> tuple[int, tuple[int, ...]] | None:
    """The largest k-h-h/2-d decoder (k = 2h, the 1024-512-256 proportions) within ``budget``
    bytes; None when not even h = MIN_HIDDEN fits."""
    h = MIN_HIDDEN
    if decoder_bytes(dim, 2 * h, (h, h // 2)) > budget:
        return None
    while decoder_bytes(dim, 2 * (h + 2), (h + 2, (h + 2) // 2)) <= budget:
        h += 2
    return 2 * h, (h, h // 2)


def smallest_decoder_bytes(dim: int) -> int:
    return decoder_bytes(dim, 2 * MIN_HIDDEN, (MIN_HIDDEN, MIN_HIDDEN // 2))


def fit_decoder(dec: DeepHashDecoder, target: torch.Tensor, weights: np.ndarray, steps: int,
                batch_size: int, lr: float, seed: int, desc: str) -> None:
    """Fit ``dec`` so dec(x) ≈ target[x] (frequency-weighted), training with batch-norm after
    each hidden linear, then folding the batch-norms in.  Works on target / rms(target) so one
    learning rate suits every table; the scale goes back into the last layer."""
    torch.manual_seed(seed)
    scale = rms(target, torch.as_tensor(weights, dtype=torch.float32))
    norms = nn.ModuleList(nn.BatchNorm1d(h) for h in dec.hidden)

    all_ids = torch.arange(target.shape[0], dtype=torch.int64)
    code_all = dec.encode(all_ids) if target.shape[0] <= batch_size else None   # full-batch: hash once

    def train_rows(ids: torch.Tensor) -> torch.Tensor:
        x = code_all if code_all is not None and torch.equal(ids, all_ids) else dec.encode(ids)
        for layer, bn in zip(dec.layers[:-1], norms):
            x = mish(bn(layer(x)))
        return dec.layers[-1](x)

    params = [*dec.layers.parameters(), *norms.parameters()]
    fit_rows(train_rows, params, target / scale, weights, steps, batch_size, lr, seed, desc)
    _refresh_statistics(train_rows, norms, weights, target.shape[0], batch_size, seed)
    fold_batchnorm(dec, norms)
    with torch.no_grad():
        dec.layers[-1].weight.mul_(scale)
        dec.layers[-1].bias.mul_(scale)


@torch.no_grad()
def fold_batchnorm(dec: DeepHashDecoder, norms: nn.ModuleList) -> None:
    """Fold eval-mode batch-norms (one per hidden layer) into the preceding linears, in place."""
    for layer, bn in zip(dec.layers[:-1], norms):
        g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        layer.bias.copy_((layer.bias - bn.running_mean) * g + bn.bias)
        layer.weight.mul_(g.unsqueeze(1))


@torch.no_grad()
def _refresh_statistics(train_rows, norms: nn.ModuleList, weights: np.ndarray, rows: int,
                        batch_size: int, seed: int, batches: int = 16) -> None:
    """Exact batch-norm statistics for the final weights (cumulative average over batches drawn
    like the training batches), so the folded model matches the trained one."""
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    norms.train()
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.as_tensor(weights, dtype=torch.float64)
    for _ in range(1 if rows <= batch_size else batches):
        ids = (torch.arange(rows) if rows <= batch_size
               else torch.multinomial(w, batch_size, replacement=True, generator=gen))
        train_rows(ids)
    norms.eval()


@register_representation("dhe")
class DHEBag(Representation):
    def __init__(self, rows: int, dim: int, k: int, hidden: tuple[int, ...] | list[int],
                 buckets: int = 1_000_000, transform: str = "uniform", seed: int = 0,
                 pooling: str = "sum"):
        super().__init__()
        self.rows, self.dim, self.pooling, self.seed = int(rows), int(dim), pooling, int(seed)
        self.decoder = DeepHashDecoder(self.dim, k, buckets, tuple(hidden), transform, self.seed)

    def forward(self, indices, offsets):
        return pool(self.decoder(indices), offsets, self.pooling)

    def params(self):
        d = self.decoder
        return {"rows": self.rows, "dim": self.dim, "k": d.k, "hidden": list(d.hidden),
                "buckets": d.buckets, "transform": d.transform, "seed": self.seed,
                "pooling": self.pooling}

    def bytes_per_lookup(self):
        return float(self.decoder.weight_bytes())   # a one-id bag streams the whole decoder

    def flops_per_lookup(self):
        return self.decoder.flops() + self.dim

    def describe(self):
        d = self.decoder
        return f"dhe {self.rows}x{self.dim}: k={d.k} {'-'.join(map(str, d.hidden))} {d.transform}"


@dataclass(frozen=True)
class DHEConfig(FitOptions):
    compression: float | None = option(None, "size the decoder to table bytes / compression (k = 2h, "
                                             "hidden h-h/2); default 8 unless k or hidden is given")
    k: int | None = option(None, "hashes: an explicit shape instead of compression (paper: 1024)")
    hidden: tuple[int, ...] = option((), "decoder hidden widths: an explicit shape instead of compression "
                                         "(paper: 512,256)")
    buckets: int = option(1_000_000, "m: hash range (paper: 10^6)")
    transform: Literal["uniform", "gaussian"] = option("uniform", "hash code -> real code: uniform in [-1, 1] or Gaussian (Box-Muller)")

    def __post_init__(self):
        super().__post_init__()
        if (self.k is not None and self.k < 1) or any(h < 1 for h in self.hidden):
            raise ValueError("k and hidden widths must be >= 1")
        if self.compression is not None and self.shape_given:
            raise ValueError("give compression or an explicit shape (k, hidden), not both")
        if self.transform == "gaussian" and self.k is not None and self.k % 2:
            raise ValueError(f"the gaussian transform pairs hashes: k must be even, got {self.k}")
        if not 2 <= self.buckets <= MAX_BUCKETS:
            raise ValueError(f"buckets must be in [2, {MAX_BUCKETS}], got {self.buckets}")

    @property
    def shape_given(self) -> bool:
        return self.k is not None or bool(self.hidden)


@register_pass("dhe", DHEConfig)
def dhe(site: EmbeddingSite, cfg: DHEConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 table -> Deep Hash Embedding (hashes + MLP), fitted to the rows by frequency."""
    table = fp32_table(site, ctx, "dhe")
    if isinstance(table, Skip):
        return table
    ratio = target_compression(cfg, cfg.shape_given)
    if ratio is None:
        k, hidden = cfg.k or PAPER_K, cfg.hidden or PAPER_HIDDEN
    else:
        planned = plan_decoder(site.dim, budget_bytes(site.rows, site.dim, ratio))
        if planned is None:
            return over_budget("dhe", smallest_decoder_bytes(site.dim), ratio, table,
                               f"k={2 * MIN_HIDDEN}, hidden {MIN_HIDDEN}-{MIN_HIDDEN // 2}")
        k, hidden = planned
    rep = DHEBag(site.rows, site.dim, k, hidden, cfg.buckets, cfg.transform, cfg.seed, site.pooling)
    skip = not_smaller("dhe", rep.num_bytes(), table)
    if skip:
        return skip
    weights = ctx.row_weights(site.name, site.rows)
    target = table.weight.detach()
    rep.train()
    steps = fit_steps(cfg, site.rows)
    fit_decoder(rep.decoder, target, weights, steps, cfg.batch_size, cfg.lr, cfg.seed,
                desc=f"dhe {site.name}")
    rep.eval()
    err = weighted_rel_error(table_rows(rep, site.rows), target, torch.as_tensor(weights, dtype=torch.float32))
    return Rewrite(rep, notes={"k": k, "hidden": list(hidden), "steps": steps, "fit_weighted_rel_error": err})
