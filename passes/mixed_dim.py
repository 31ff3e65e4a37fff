"""Mixed-dimension embedding (Ginart et al.; dlrm ``--md-flag``), fitted to a trained table.

Before: W [rows, d].   After: E [rows, d_i] and a bias-free projection P [d, d_i] with
    e(bag) = (sum_i E[i]) Pᵀ,
the layout of dlrm's PrEmbeddingBag (``embs.weight``, ``proj.weight``).

Fit (pass ``md``): minimise Σ_i w_i ||W_i - E_i Pᵀ||² (w_i: access frequency).  For orthonormal
P the best E is W P, and the objective becomes Σ w_i ||W_i||² - tr(Pᵀ G P) with
G = Wᵀ diag(w) W, so P holds G's top d_i eigenvectors: the frequency-weighted truncated SVD
(right singular vectors of diag(√w) W), computed from the d × d Gram matrix in float64.
d_i comes from an energy target (the fewest d_i whose share of G's eigenvalues reaches
``energy``) or from Ginart's popularity rule d_i = λ (n_i / k_i)^(-α) (n_i rows, k_i lookups per
sample), with λ giving the model's smallest n/k table the full d (dlrm's md_solver with d0) or
fitting a byte ``budget`` over the selected tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from rewrite.core.embedding import FusedLookup, Representation, TableBag, f32_rows, gather_pool, register_representation
from rewrite.core.errors import RewriteError
from rewrite.core.pass_contract import PassContext, Rewrite, Selection, Skip, option, plain_fp32_table, register_pass
from rewrite.core.tracing import EmbeddingSite
from rewrite.core.units import parse_bytes

DLRM_MD_THRESHOLD = 200       # rows; dlrm_s_pytorch.py --md-threshold default: only larger tables


@register_representation("md")
class MDBag(Representation):
    def __init__(self, rows: int, dim: int, inner_dim: int, pooling: str = "sum"):
        super().__init__()
        self.rows, self.dim, self.inner_dim, self.pooling = int(rows), int(dim), int(inner_dim), pooling
        self.weight = nn.Parameter(torch.empty(self.rows, self.inner_dim))
        self.proj = nn.Parameter(torch.empty(self.dim, self.inner_dim))

    def forward(self, indices, offsets):
        pooled = gather_pool(self.weight, indices, offsets, self.pooling)
        return pooled @ self.proj.t()

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "inner_dim": self.inner_dim, "pooling": self.pooling}

    def bytes_per_lookup(self):
        return self.inner_dim * 4

    def flops_per_lookup(self):
        return float(self.inner_dim + 2 * self.dim * self.inner_dim)  # pool add + projection

    def describe(self):
        return f"md {self.rows}x{self.inner_dim} -> {self.dim}"

    def fused_lookup(self) -> FusedLookup:
        """Pooled in the inner dim, projected after pooling."""
        return FusedLookup("rows", self.inner_dim, f32_rows(self.weight),
                           project=self.proj.detach().t().contiguous())


def md_bytes(rows: int, dim: int, inner: int) -> int:
    return 4 * (rows + dim) * inner


def weighted_spectrum(weight: torch.Tensor, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors [d, d] of G = Wᵀ diag(w) W, in float64."""
    x = weight.detach().to(torch.float64)
    gram = (x * torch.from_numpy(w).unsqueeze(1)).t() @ x
    vals, vecs = np.linalg.eigh(gram.numpy())
    order = np.argsort(vals)[::-1]
    return np.clip(vals[order], 0.0, None), vecs[:, order]


def fit_md(weight: torch.Tensor, w: np.ndarray, inner: int, pooling: str = "sum",
           vecs: np.ndarray | None = None) -> MDBag:
    """The frequency-weighted best rank-``inner`` MD form of ``weight`` [rows, d] (``vecs``: the
    eigenvectors of ``weighted_spectrum(weight, w)`` when the caller has them)."""
    if vecs is None:
        _, vecs = weighted_spectrum(weight, w)
    proj = torch.from_numpy(vecs[:, :inner].copy())
    rep = MDBag(weight.shape[0], weight.shape[1], inner, pooling)
    rep.proj.data = proj.to(torch.float32)
    rep.weight.data = (weight.detach().to(torch.float64) @ proj).to(torch.float32)
    return rep


def energy_dim(vals: np.ndarray, energy: float) -> int:
    """Fewest leading eigenvalues whose share of the total reaches ``energy``."""
    total = vals.sum()
    if total <= 0:
        return 1
    share = np.cumsum(vals) / total
    return int(min(len(vals), np.searchsorted(share, energy - 1e-12) + 1))


def popularity_dims(scale: dict[str, float], dim: int, alpha: float, lam: float, round_pow2: bool,
                    rounding=round) -> dict[str, int]:
    """d_t = λ · scale_t^(-α), clamped to [1, dim] (optionally rounded to a power of two)."""
    out = {}
    for t, s in scale.items():
        d = lam * s ** (-alpha)
        if round_pow2 and d >= 1:
            d = 2 ** round(math.log2(d))
        out[t] = max(1, min(dim, int(rounding(d))))
    return out


def rows_per_query(ctx: PassContext, table: str, rows: int) -> float:
    """n / k: rows over average lookups per sample (k = 1 without a profile)."""
    k = ctx.lookups_per_sample(table)
    return rows / k if k and k > 0 else float(rows)


@dataclass(frozen=True)
class MDConfig(Selection):
    min_rows: int = option(DLRM_MD_THRESHOLD + 1, "leave tables with fewer rows alone (dlrm's "
                           "--md-threshold: only tables with more than 200 rows)")
    rule: Literal["energy", "popularity"] = option("energy", "how d_i is chosen: spectrum energy, or "
                                                   "Ginart's d_i = λ (rows/lookups)^-alpha")
    energy: float = option(0.95, "rule=energy: keep the fewest dims holding this share of the "
                                 "frequency-weighted spectrum")
    alpha: float = option(0.3, "rule=popularity: temperature (dlrm --md-temperature)")
    budget: str | None = option(None, "rule=popularity: total bytes of the selected tables (e.g. 1MiB); "
                                      "default: the model's smallest table keeps the full dim")
    compression: float | None = option(None, "bytes ratio: d_i = the largest inner dim whose E and P fit "
                                             "table bytes / compression (replaces rule)")
    round_pow2: bool = option(False, "rule=popularity: round d_i to a power of two (dlrm --md-round-dims)")
    max_error: float = option(0.5, "fail when ||Δe|| / ||e|| over the sample bags exceeds this")

    def __post_init__(self):
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.max_error > 0:
            raise ValueError(f"max_error must be > 0, got {self.max_error}")
        if self.compression is not None:
            if not self.compression > 1:
                raise ValueError(f"compression must be > 1, got {self.compression}")
            if self.rule != "energy" or self.budget is not None:
                raise ValueError("compression sizes d_i itself: give it without rule=popularity / budget")
        if self.budget is not None:
            if self.rule != "popularity":
                raise ValueError("budget applies to rule=popularity (add rule=popularity)")
            try:
                parse_bytes(self.budget)
            except RewriteError as e:
                raise ValueError(str(e)) from None

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget is None else parse_bytes(self.budget)


def _plain_fp32(rep) -> bool:
    return isinstance(rep, TableBag) and rep.weight.dtype == torch.float32


def popularity_dim(site: EmbeddingSite, cfg: MDConfig, ctx: PassContext) -> int:
    """Ginart's rule for this table; λ from the smallest n/k table or from the byte budget."""
    model = ctx.model
    if cfg.budget_bytes is None:
        smallest = min(rows_per_query(ctx, t, r.rows) for t, r in model.embeddings.items())
        lam = site.dim * smallest ** cfg.alpha
        return popularity_dims({site.name: rows_per_query(ctx, site.name, site.rows)}, site.dim,
                               cfg.alpha, lam, cfg.round_pow2)[site.name]
    chosen = {t: r for t, r in model.embeddings.items() if cfg.selects(t, r.rows) and _plain_fp32(r)}
    scale = {t: rows_per_query(ctx, t, r.rows) for t, r in chosen.items()}

    def cost(dims: dict[str, int]) -> int:
        return sum(md_bytes(chosen[t].rows, chosen[t].dim, d) for t, d in dims.items())

    floor_dims = {t: 1 for t in chosen}
    if cost(floor_dims) > cfg.budget_bytes:
        raise RewriteError(f"pass md: budget {cfg.budget} ({cfg.budget_bytes} B) is below the smallest "
                           f"md form of the selected tables ({cost(floor_dims)} B with d_i = 1)")
    lo, hi = 0.0, site.dim * max(scale.values()) ** cfg.alpha   # hi gives every table the full d
    for _ in range(60):   # bisection on λ: the byte count is monotone in λ
        mid = (lo + hi) / 2
        dims = popularity_dims(scale, site.dim, cfg.alpha, mid, cfg.round_pow2, math.floor)
        lo, hi = (mid, hi) if cost(dims) <= cfg.budget_bytes else (lo, mid)
    return popularity_dims(scale, site.dim, cfg.alpha, lo, cfg.round_pow2, math.floor)[site.name]


def weighted_table(site: EmbeddingSite, ctx: PassContext, pass_name: str):
    """What md and mdq size and fit from: (the plain fp32 table, its row weights, and their
    ``weighted_spectrum`` (vals, vecs)), or the Skip of a table that is not plain fp32."""
    table = plain_fp32_table(site, ctx, pass_name)
    if isinstance(table, Skip):
        return table
    w = ctx.row_weights(site.name, site.rows)
    return (table, w, *weighted_spectrum(table.weight, w))


@register_pass("md", MDConfig)
def md(site: EmbeddingSite, cfg: MDConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 tables -> mixed dimension E [rows, d_i] + projection (frequency-weighted SVD)."""
    fitted = weighted_table(site, ctx, "md")
    if isinstance(fitted, Skip):
        return fitted
    table, w, vals, vecs = fitted
    if cfg.compression is not None:
        budget = int(table.num_bytes() / cfg.compression)
        inner, why = budget // (4 * (site.rows + site.dim)), f"compression {cfg.compression:g}"
        if inner < 1:
            return Skip(f"md's smallest form (d_i = 1) takes {md_bytes(site.rows, site.dim, 1)} bytes; "
                        f"compression={cfg.compression:g} of this {table.num_bytes()}-byte table allows {budget}")
    elif cfg.rule == "energy":
        inner, why = energy_dim(vals, cfg.energy), f"energy {cfg.energy:g}"
    else:
        inner, why = popularity_dim(site, cfg, ctx), f"popularity rule, alpha {cfg.alpha:g}"
    if inner >= site.dim:
        return Skip(f"{why} keeps all {site.dim} dimensions")
    if md_bytes(site.rows, site.dim, inner) >= table.num_bytes():
        return Skip(f"{why} gives d_i={inner}, whose md form ({md_bytes(site.rows, site.dim, inner)} B) "
                    f"is not smaller than the table ({table.num_bytes()} B)")
    rep = fit_md(table.weight, w, inner, site.pooling, vecs)
    kept = float(vals[:inner].sum() / vals.sum()) if vals.sum() > 0 else 1.0
    return Rewrite(rep, notes={"inner_dim": inner, "rule": cfg.rule, "energy_kept": kept})
