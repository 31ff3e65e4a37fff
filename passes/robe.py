"""ROBE-Z (Desai et al., MLSys'22): every row read as blocks of one shared circular array.

Before: W [rows, d], e(bag) = Σ_{x in bag} W[x].
After:  A [size] (one array), d = n_b · Z (n_b blocks of Z consecutive slots):
            o_c(x) = h_c(x) mod size                  block c's hashed offset (c < n_b)
            s_c(x) = 1 − 2 (g_c(x) mod 2)             a hashed sign (``signed``), or 1
            e(x)[c·Z + t] = s_c(x) · A[(o_c(x) + t) mod size]      t < Z (circular: wraps)
        e(bag) = Σ_{x in bag} e(x)
The slot arithmetic is elementwise int64 (hash, add a lane vector, remainder) and one gather.
Fit (closed form): every element (x, i) reads exactly one slot, so the frequency-weighted
least-squares problem  min Σ_x w_x ||e(x) − W[x]||²  separates per slot:
            A[s] = Σ_{(x,i) -> s} w_x s_c(x) W[x, i] / Σ_{(x,i) -> s} w_x    (0 if unread)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from passes.universal_hash import hash_coefficients, hash_ops, universal_hash
from passes.rowfit import (budget_bytes, check_fit_options, fp32_table, not_smaller, over_budget, table_rows,
                           target_compression, weighted_rel_error)
from rewrite.core.embedding import Representation, pool, register_representation
from rewrite.core.pass_contract import PassContext, Rewrite, Selection, Skip, option, register_pass
from rewrite.core.tracing import EmbeddingSite

FIT_CHUNK = 1 << 16            # rows per closed-form accumulation step (memory: chunk × d × 8 B)


@register_representation("robe")
class RobeBag(Representation):
    def __init__(self, rows: int, dim: int, size: int, block: int, signed: bool = True,
                 seed: int = 0, pooling: str = "sum"):
        super().__init__()
        if block < 1 or dim % block:
            raise ValueError(f"block must divide the dimension {dim}, got {block}")
        self.rows, self.dim, self.pooling, self.seed = int(rows), int(dim), pooling, int(seed)
        self.size, self.block, self.signed = int(size), int(block), bool(signed)
        self.blocks = self.dim // self.block
        self.array = nn.Parameter(torch.zeros(self.size))
        a, b = hash_coefficients(2 * self.blocks, self.seed)
        self.register_buffer("offset_a", a[:self.blocks].clone())
        self.register_buffer("offset_b", b[:self.blocks].clone())
        if self.signed:
            self.register_buffer("sign_a", a[self.blocks:].clone())
            self.register_buffer("sign_b", b[self.blocks:].clone())
        self.register_buffer("lane", torch.arange(self.block, dtype=torch.int64))

    def slots(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, blocks, Z] int64: the array slot of every element of every id's row."""
        start = universal_hash(ids, self.offset_a, self.offset_b, self.size)          # [n, nb]
        return torch.remainder(start.unsqueeze(2) + self.lane, self.size)

    def signs(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, blocks, 1] float32 in {−1, +1}."""
        bit = universal_hash(ids, self.sign_a, self.sign_b, 2)
        return (1 - 2 * bit).to(torch.float32).unsqueeze(2)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        vals = self.array.index_select(0, self.slots(ids).reshape(-1)).reshape(-1, self.blocks, self.block)
        if self.signed:
            vals = vals * self.signs(ids)
        return vals.reshape(-1, self.dim)

    def forward(self, indices, offsets):
        return pool(self.embed(indices), offsets, self.pooling)

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "size": self.size, "block": self.block,
                "signed": self.signed, "seed": self.seed, "pooling": self.pooling}

    def bytes_per_lookup(self):
        return float(4 * self.dim)

    def flops_per_lookup(self):
        sign = hash_ops(self.blocks) + 3 * self.blocks + self.dim if self.signed else 0
        return float(hash_ops(self.blocks) + 2 * self.dim + sign + self.dim)

    def describe(self):
        return (f"robe {self.rows}x{self.dim}: array {self.size} floats, block {self.block}"
                f"{', signed' if self.signed else ''}")


@torch.no_grad()
def fit_robe(rep: RobeBag, target: torch.Tensor, weights: np.ndarray, desc: str = "robe") -> None:
    """The closed-form weighted least-squares array (module docstring)."""
    num = torch.zeros(rep.size, dtype=torch.float64)
    den = torch.zeros(rep.size, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    for lo in tqdm(range(0, rep.rows, FIT_CHUNK), desc=desc, unit="chunk", leave=False):
        ids = torch.arange(lo, min(rep.rows, lo + FIT_CHUNK), dtype=torch.int64)
        vals = target[lo:lo + len(ids)].to(torch.float64).reshape(-1, rep.blocks, rep.block)
        if rep.signed:
            vals = vals * rep.signs(ids).to(torch.float64)
        wx = w[lo:lo + len(ids)].reshape(-1, 1, 1).expand_as(vals)
        slots = rep.slots(ids).reshape(-1)
        num.index_add_(0, slots, (wx * vals).reshape(-1))
        den.index_add_(0, slots, wx.reshape(-1))
    rep.array.copy_((num / den.clamp(min=1e-30)).to(torch.float32))


def robe_bytes(size: int, dim: int, block: int, signed: bool) -> int:
    blocks = dim // block
    return 4 * size + 16 * blocks * (2 if signed else 1) + 8 * block


@dataclass(frozen=True)
class RobeConfig(Selection):
    compression: float | None = option(None, "array bytes ≈ table bytes / compression; default 8 unless "
                                             "size is given")
    size: int | None = option(None, "array floats: an explicit shape instead of compression")
    block: int = option(8, "Z: consecutive slots per block (divides the dim)")
    signed: bool = option(True, "hashed ±1 per block (unbiased collisions)")
    max_error: float = option(0.9, "relative embedding error accepted (passes.rowfit explains 0.9)")
    seed: int = option(0, "seed of the hash coefficients and the fit")

    def __post_init__(self):
        check_fit_options(self)
        if (self.size is not None and self.size < 1) or self.block < 1:
            raise ValueError("size and block must be >= 1")
        if self.compression is not None and self.size is not None:
            raise ValueError("give compression or size, not both")


@register_pass("robe", RobeConfig)
def robe(site: EmbeddingSite, cfg: RobeConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 table -> one hashed circular array read in blocks (ROBE-Z), least-squares fit."""
    table = fp32_table(site, ctx, "robe")
    if isinstance(table, Skip):
        return table
    if site.dim % cfg.block:
        return Skip(f"block={cfg.block} does not divide the dimension {site.dim}")
    ratio = target_compression(cfg, cfg.size is not None)
    size = cfg.size
    if ratio is not None:
        overhead = robe_bytes(0, site.dim, cfg.block, cfg.signed)
        size = (budget_bytes(site.rows, site.dim, ratio) - overhead) // 4
        if size < cfg.block:
            return over_budget("robe", robe_bytes(cfg.block, site.dim, cfg.block, cfg.signed), ratio, table,
                               f"an array of one block, {cfg.block} floats")
    rep = RobeBag(site.rows, site.dim, size, cfg.block, cfg.signed, cfg.seed, site.pooling)
    skip = not_smaller("robe", rep.num_bytes(), table)
    if skip:
        return skip
    weights = ctx.row_weights(site.name, site.rows)
    target = table.weight.detach()
    fit_robe(rep, target, weights, desc=f"robe {site.name}")
    err = weighted_rel_error(table_rows(rep, site.rows), target, torch.as_tensor(weights, dtype=torch.float32))
    return Rewrite(rep, notes={"size": size, "fit_weighted_rel_error": err})
