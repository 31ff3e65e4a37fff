"""MEM-REC (arXiv 2305.07205): Bloom-filter encodings into a token table and a weight table.

Before: W [rows, d], e(bag) = Σ_{x in bag} W[x].
After:  token table T [D, d] read at K hashes h_j(x) ∈ [0, D)   (x's Bloom-filter code, K ones)
        weight table V [dw, K'] read at kw hashes g_i(x) ∈ [0, dw), K' = K (a weight per token)
        or 1 (one scale for all tokens):
            α(x) = Σ_{i<kw} V[g_i(x)]                              [K']
            e(x) = Σ_{j<K} α_j(x) · T[h_j(x)]                      [d]
        e(bag) = Σ_{x in bag} e(x)
Fit: frequency-weighted least squares by Adam from a closed-form start (α = 1 and each token
row the weighted mean of the rows hashing to it, divided by K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from passes.universal_hash import hash_coefficients, hash_ops, universal_hash
from passes.rowfit import (FitOptions, budget_bytes, fit_rows, fit_steps, fp32_table, not_smaller, over_budget,
                           rms, table_rows, target_compression, weighted_rel_error)
from rewrite.core.embedding import Representation, pool, register_representation
from rewrite.core.pass_contract import PassContext, Rewrite, Skip, option, register_pass
from rewrite.core.tracing import EmbeddingSite


@register_representation("memrec")
class MemRecBag(Representation):
    def __init__(self, rows: int, dim: int, tokens: int, k: int, weight_rows: int, kw: int,
                 per_token_weights: bool = True, seed: int = 0, pooling: str = "sum"):
        super().__init__()
        self.rows, self.dim, self.pooling, self.seed = int(rows), int(dim), pooling, int(seed)
        self.tokens, self.k, self.weight_rows, self.kw = int(tokens), int(k), int(weight_rows), int(kw)
        self.per_token_weights = bool(per_token_weights)
        self.token_table = nn.Parameter(torch.zeros(self.tokens, self.dim))
        self.weight_table = nn.Parameter(torch.zeros(self.weight_rows, self.k if self.per_token_weights else 1))
        a, b = hash_coefficients(self.k + self.kw, self.seed)
        self.register_buffer("token_a", a[:self.k].clone())
        self.register_buffer("token_b", b[:self.k].clone())
        self.register_buffer("weight_a", a[self.k:].clone())
        self.register_buffer("weight_b", b[self.k:].clone())

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """e(x) for each id: [n, d]."""
        tok = universal_hash(ids, self.token_a, self.token_b, self.tokens)             # [n, K]
        rows = self.token_table.index_select(0, tok.reshape(-1)).reshape(-1, self.k, self.dim)
        wid = universal_hash(ids, self.weight_a, self.weight_b, self.weight_rows)      # [n, kw]
        width = self.weight_table.shape[1]
        alpha = self.weight_table.index_select(0, wid.reshape(-1)).reshape(-1, self.kw, width).sum(1)
        return (alpha.unsqueeze(2) * rows).sum(1)

    def forward(self, indices, offsets):
        return pool(self.embed(indices), offsets, self.pooling)

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "tokens": self.tokens, "k": self.k,
                "weight_rows": self.weight_rows, "kw": self.kw,
                "per_token_weights": self.per_token_weights, "seed": self.seed, "pooling": self.pooling}

    def bytes_per_lookup(self):
        return float(4 * (self.k * self.dim + self.kw * self.weight_table.shape[1]))

    def flops_per_lookup(self):
        width = self.weight_table.shape[1]
        return float(hash_ops(self.k) + hash_ops(self.kw) - 1 + (self.kw - 1) * width
                     + 2 * self.k * self.dim + self.dim)

    def describe(self):
        return (f"memrec {self.rows}x{self.dim}: tokens {self.tokens}x{self.dim} K={self.k}, "
                f"weights {tuple(self.weight_table.shape)} kw={self.kw}")


def memrec_bytes(dim: int, tokens: int, k: int, weight_rows: int, kw: int, per_token: bool) -> int:
    return 4 * (tokens * dim + weight_rows * (k if per_token else 1)) + 16 * (k + kw)


@dataclass(frozen=True)
class MemRecConfig(FitOptions):
    compression: float | None = option(None, "size D (and dw) to table bytes / compression; default 8 "
                                             "unless tokens or weight_rows is given")
    tokens: int | None = option(None, "D: an explicit shape instead of compression (4096)")
    k: int = option(2, "K token hashes")
    weight_rows: int | None = option(None, "dw: an explicit shape instead of compression (1024)")
    kw: int = option(2, "weight hashes")
    weight_share: float = option(0.1, "share of the budget for the weight table (compression set)")
    per_token_weights: bool = option(True, "V [dw, K] (False: V [dw, 1])")

    def __post_init__(self):
        super().__post_init__()
        if min(self.tokens or 1, self.k, self.weight_rows or 1, self.kw) < 1:
            raise ValueError("tokens, k, weight_rows and kw must be >= 1")
        if self.compression is not None and self.shape_given:
            raise ValueError("give compression or an explicit shape (tokens, weight_rows), not both")
        if not 0 < self.weight_share < 1:
            raise ValueError(f"weight_share must be in (0, 1), got {self.weight_share}")

    @property
    def shape_given(self) -> bool:
        return self.tokens is not None or self.weight_rows is not None


EXPLICIT_DEFAULTS = (4096, 1024)   # D, dw when only one of them is given


def plan_memrec(rows: int, dim: int, cfg: MemRecConfig) -> tuple[int, int] | None:
    """(D, dw): the config's shape, or the byte budget (``compression``, by default 8) split
    weight_share : 1 − weight_share; None when it cannot hold one token row and one weight row."""
    ratio = target_compression(cfg, cfg.shape_given)
    if ratio is None:
        return cfg.tokens or EXPLICIT_DEFAULTS[0], cfg.weight_rows or EXPLICIT_DEFAULTS[1]
    budget = budget_bytes(rows, dim, ratio) - 16 * (cfg.k + cfg.kw)
    width = cfg.k if cfg.per_token_weights else 1
    weight_rows = max(1, int(budget * cfg.weight_share) // (4 * width))
    tokens = (budget - 4 * width * weight_rows) // (4 * dim)
    if tokens < 1:
        return None
    return int(tokens), int(weight_rows)


@torch.no_grad()
def init_memrec(rep: MemRecBag, target: torch.Tensor, weights: np.ndarray) -> None:
    """α = 1 (each weight row 1/kw), token rows = weighted mean of the rows using them / K."""
    rep.weight_table.fill_(1.0 / rep.kw)
    tok = universal_hash(torch.arange(rep.rows), rep.token_a, rep.token_b, rep.tokens)
    w = torch.as_tensor(weights, dtype=torch.float64)
    num = torch.zeros(rep.tokens, rep.dim, dtype=torch.float64)
    den = torch.zeros(rep.tokens, dtype=torch.float64)
    for j in range(rep.k):
        num.index_add_(0, tok[:, j], w.unsqueeze(1) * target.to(torch.float64))
        den.index_add_(0, tok[:, j], w)
    rep.token_table.copy_((num / den.clamp(min=1e-30).unsqueeze(1) / rep.k).to(torch.float32))


@register_pass("memrec", MemRecConfig)
def memrec(site: EmbeddingSite, cfg: MemRecConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 table -> MEM-REC token + weight tables (Bloom-filter hashing), fitted by frequency."""
    table = fp32_table(site, ctx, "memrec")
    if isinstance(table, Skip):
        return table
    planned = plan_memrec(site.rows, site.dim, cfg)
    if planned is None:
        return over_budget("memrec", memrec_bytes(site.dim, 1, cfg.k, 1, cfg.kw, cfg.per_token_weights),
                           target_compression(cfg, False), table, "1 token row, 1 weight row")
    tokens, weight_rows = planned
    rep = MemRecBag(site.rows, site.dim, tokens, cfg.k, weight_rows, cfg.kw, cfg.per_token_weights,
                    cfg.seed, site.pooling)
    skip = not_smaller("memrec", rep.num_bytes(), table)
    if skip:
        return skip
    weights = ctx.row_weights(site.name, site.rows)
    target = table.weight.detach()
    w = torch.as_tensor(weights, dtype=torch.float32)
    scale = rms(target, w)               # fit target / scale: one lr suits every table
    init_memrec(rep, target / scale, weights)
    start = weighted_rel_error(table_rows(rep, site.rows), target / scale, w)
    steps = fit_steps(cfg, site.rows)
    fit_rows(rep.embed, rep.parameters(), target / scale, weights, steps, cfg.batch_size,
             cfg.lr, cfg.seed, desc=f"memrec {site.name}")
    with torch.no_grad():
        rep.token_table.mul_(scale)
    return Rewrite(rep, notes={"tokens": tokens, "weight_rows": weight_rows, "steps": steps, "init_rel_error": start,
                               "fit_weighted_rel_error": weighted_rel_error(table_rows(rep, site.rows), target, w)})
