"""Per-row dimension pruning (FIITED-style, applied after training) with chunked storage.

Before: W [rows, d].
After:  a rotation V (d×d, the table's frequency-weighted PCA basis), levels d_0 > d_1 > ... (default
        d, d/2, d/4, 0), one dense block B_l [n_l, d_l] per level holding the leading d_l
        coordinates of Z = W V for the rows at that level, and a packed remap per row:
            remap[i] = level_i · 2^s + offset_i      (s = 15 or 31 minus the level-code bits)
        in the narrowest of int16 / int32 that the level sizes allow.
        e(bag) = (Σ_{i in bag} pad_d(B_{level_i}[offset_i])) Vᵀ      (zero padding to d).

Utility and allocation.  With f_i the access frequency (profile counts + 1), the expected squared
error of a looked-up row is Σ_i f_i ‖W_i − Ŵ_i‖² / Σ f, and keeping the leading d_l rotated
coordinates loses ‖Z_i[d_l:]‖².  Row i's utility is u_i = f_i^β ‖W_i‖² (β = 1: exactly that
expected error; β < 1 protects rarely seen rows, FIITED's knob); level l costs it
c_il = f_i^β ‖Z_i[d_l:]‖².  Rows get levels by a Lagrangian knapsack: for a price λ per byte each
row picks argmin_l c_il + λ·4 d_l, and λ is bisected to the largest total that fits the
budget, which minimises Σ c_il over the allocations reachable by a price (all but a few rows'
worth of bytes).  PCA first (eigenvectors of Σ f_i W_iᵀ W_i, eigenvalues descending) puts the
most frequency-weighted energy in the leading coordinates, so truncation loses least; V costs
4d² bytes.  ``rotate=false`` keeps the original leading dims (no V).

Lookup (export-friendly): one gather of the remap, level and offset by trunc division, then per
level a gather with the offset masked to 0 for other levels (row 0 stays cached) times the
level mask, padded with static widths and summed; pool; one d×d matmul per bag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rewrite.core.embedding import FusedLookup, Representation, pool, register_representation
from rewrite.core.pass_contract import PassContext, Rewrite, Selection, Skip, option, plain_fp32_table, register_pass
from rewrite.core.tracing import EmbeddingSite
from rewrite.core.units import check_bytes_option, parse_bytes

DEFAULT_KEEP = 0.5          # share of the table's values kept when neither keep nor budget is given
BISECTION_STEPS = 100       # λ bisection steps (float64; more changes nothing)


def code_bits(n_levels: int) -> int:
    return max(1, math.ceil(math.log2(n_levels)))


def remap_layout(counts: list[int], n_levels: int) -> tuple[str, int]:
    """(dtype, offset bits) of the narrowest packed remap for levels holding ``counts`` rows."""
    bits = code_bits(n_levels)
    for dtype, width in (("int16", 15), ("int32", 31)):
        if max(counts, default=0) <= 2 ** (width - bits):
            return dtype, width - bits
    raise ValueError(f"a level of {max(counts)} rows does not fit an int32 remap")


def default_levels(dim: int) -> tuple[int, ...]:
    return tuple(sorted({dim, dim // 2, dim // 4, 0}, reverse=True))


@register_representation("pruned")
class PrunedDimBag(Representation):
    def __init__(self, rows: int, dim: int, levels: list[int], counts: list[int], pooling: str = "sum",
                 rotate: bool = True):
        super().__init__()
        self.rows, self.dim, self.pooling, self.rotate = int(rows), int(dim), pooling, bool(rotate)
        self.levels, self.counts = tuple(map(int, levels)), tuple(map(int, counts))
        if sum(self.counts) != self.rows or len(self.counts) != len(self.levels):
            raise ValueError(f"level counts {self.counts} do not add up to {self.rows} rows")
        self.remap_dtype, self.offset_bits = remap_layout(list(self.counts), len(self.levels))
        self.stored = [l for l, (d, n) in enumerate(zip(self.levels, self.counts)) if d and n]
        if not self.stored:
            raise ValueError("every row is at 0 dims: nothing to store")
        for l in self.stored:
            self.register_parameter(f"block{l}", nn.Parameter(torch.empty(self.counts[l], self.levels[l])))
        self.register_buffer("remap", torch.empty(self.rows, dtype=getattr(torch, self.remap_dtype)))
        if self.rotate:
            self.rotation = nn.Parameter(torch.empty(self.dim, self.dim))

    def forward(self, indices, offsets):
        packed = self.remap.index_select(0, indices).to(torch.int64)
        level = torch.div(packed, 2 ** self.offset_bits, rounding_mode="trunc")
        offset = packed - level * 2 ** self.offset_bits
        rows = None
        for l in self.stored:
            mine = level == l
            got = getattr(self, f"block{l}").index_select(0, torch.where(mine, offset, 0))
            got = got * mine.unsqueeze(1).to(got.dtype)
            if self.levels[l] < self.dim:
                got = nn.functional.pad(got, (0, self.dim - self.levels[l]))
            rows = got if rows is None else rows + got
        pooled = pool(rows, offsets, self.pooling)
        return pooled @ self.rotation if self.rotate else pooled

    def fused_lookup(self) -> FusedLookup:
        """Each lookup reads its level's row (zero-padded to dim); the rotation follows pooling."""
        blocks = tuple(getattr(self, f"block{l}").detach().contiguous() if l in self.stored else None
                       for l in range(len(self.levels)))
        return FusedLookup("pruned", self.dim, blocks=blocks, remap=self.remap, offset_bits=self.offset_bits,
                           project=self.rotation.detach().contiguous() if self.rotate else None)

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "levels": list(self.levels),
                "counts": list(self.counts), "pooling": self.pooling, "rotate": self.rotate}

    def bytes_per_lookup(self):
        """Upper bound: the remap entry and a row of the widest stored level."""
        return float(self.remap.element_size() + 4 * max(self.levels[l] for l in self.stored))

    def flops_per_lookup(self):
        per_level = sum(self.levels[l] + (self.dim if self.levels[l] < self.dim else 0) for l in self.stored)
        return float(per_level + self.dim + (2 * self.dim * self.dim if self.rotate else 0))

    def describe(self):
        hist = ", ".join(f"{n}x{d}" for d, n in zip(self.levels, self.counts))
        return f"pruned {self.rows}x{self.dim} [{hist}] remap {self.remap_dtype}" + (" +pca" if self.rotate else "")


def weighted_pca(weight: np.ndarray, f: np.ndarray) -> np.ndarray:
    """V [d, d]: eigenvectors of Σ f_i W_iᵀ W_i, columns by descending eigenvalue."""
    vals, vecs = np.linalg.eigh((weight * f[:, None]).T @ weight)
    return vecs[:, np.argsort(vals)[::-1]]


def allocate(cost: np.ndarray, level_bytes: np.ndarray, budget: float) -> np.ndarray:
    """Level per row minimising Σ cost[i, level_i] s.t. Σ level_bytes[level_i] <= budget, by the
    Lagrangian price λ (module doc).  cost [rows, L] (non-increasing in kept bytes)."""
    def pick(lam: float) -> np.ndarray:
        return np.argmin(cost + lam * level_bytes[None, :], axis=1)

    def spent(choice: np.ndarray) -> float:
        return float(level_bytes[choice].sum())

    lo, hi = 0.0, 1.0
    if spent(pick(lo)) <= budget:
        return pick(lo)
    while spent(pick(hi)) > budget and hi < 1e300:
        hi *= 16.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(pick(mid)) <= budget else (mid, hi)
    return pick(hi)


@dataclass(frozen=True)
class PruneDimsConfig(Selection):
    keep: float | None = option(None, "share of the table's values kept (Σ d_i / rows·d)")
    budget: str | None = option(None, "bytes of the whole representation, per table, e.g. 48KB")
    compression: float | None = option(None, "bytes ratio: budget = table bytes / compression, per table")
    levels: tuple[int, ...] = option((), "kept dims per level, descending; default d, d/2, d/4, 0")
    beta: float = option(1.0, "utility exponent of the access frequency")
    rotate: bool = option(True, "frequency-weighted PCA rotation first (d×d fp32, counted)")
    max_error: float | None = option(None, "verification bound: relative error on the sample bags")

    def __post_init__(self):
        given = [n for n in ("keep", "budget", "compression") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of keep, budget, compression (got {', '.join(given)})")
        if self.compression is not None and not self.compression > 1:
            raise ValueError(f"compression must be > 1, got {self.compression}")
        if self.keep is not None and not 0 < self.keep < 1:
            raise ValueError(f"keep must be in (0, 1), got {self.keep}")
        check_bytes_option("budget", self.budget)
        if any(a <= b for a, b in zip(self.levels, self.levels[1:])) or any(l < 0 for l in self.levels):
            raise ValueError(f"levels must be distinct non-negative dims, descending (got {self.levels})")
        if len(self.levels) == 1:
            raise ValueError("give at least 2 levels")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.max_error is not None and not 0 < self.max_error < 1:
            raise ValueError(f"max_error must be in (0, 1), got {self.max_error}")


@register_pass("prune-dims", PruneDimsConfig)
def prune_dims(site: EmbeddingSite, cfg: PruneDimsConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 tables -> per-row kept dims (utility f^β‖W‖², PCA-rotated) in per-level blocks."""
    table = plain_fp32_table(site, ctx, "prune-dims")
    if isinstance(table, Skip):
        return table
    levels = cfg.levels or default_levels(site.dim)
    if levels[0] > site.dim:
        return Skip(f"levels {','.join(map(str, levels))} exceed the table's dim {site.dim}")
    rows, d = site.rows, site.dim
    worst_remap = remap_layout([rows], len(levels))[0]
    overhead = rows * (2 if worst_remap == "int16" else 4) + (4 * d * d if cfg.rotate else 0)
    if cfg.budget is not None or cfg.compression is not None:
        total = parse_bytes(cfg.budget) if cfg.budget is not None else int(table.num_bytes() / cfg.compression)
        values_budget = total - overhead
        if values_budget < 0:
            given = f"budget={cfg.budget}" if cfg.budget is not None else f"compression={cfg.compression:g} ({total} bytes)"
            return Skip(f"{given} is below the remap + rotation ({overhead} bytes)")
    else:
        values_budget = (cfg.keep if cfg.keep is not None else DEFAULT_KEEP) * rows * d * 4
    weight = table.weight.detach().to(torch.float64).numpy()
    f = ctx.row_weights(site.name, rows)
    basis = weighted_pca(weight, f) if cfg.rotate else np.eye(d)
    z = weight @ basis
    tail = np.concatenate([np.cumsum((z ** 2)[:, ::-1], axis=1)[:, ::-1], np.zeros((rows, 1))], axis=1)
    cost = (f ** cfg.beta)[:, None] * tail[:, list(levels)]
    choice = allocate(cost, 4.0 * np.asarray(levels, dtype=np.float64), values_budget)
    counts = np.bincount(choice, minlength=len(levels))
    if all(levels[l] == 0 or counts[l] == 0 for l in range(len(levels))):
        return Skip(f"the budget keeps no values (every row at 0 dims; {int(values_budget)} bytes for values)")
    rep = PrunedDimBag(rows, d, list(levels), counts.tolist(), site.pooling, cfg.rotate)
    offsets = np.zeros(rows, dtype=np.int64)
    with torch.no_grad():
        for l in range(len(levels)):
            ids = np.flatnonzero(choice == l)
            offsets[ids] = np.arange(len(ids))
            if l in rep.stored:
                getattr(rep, f"block{l}").copy_(torch.from_numpy(z[ids, :levels[l]]))
        rep.remap.copy_(torch.from_numpy(choice * 2 ** rep.offset_bits + offsets))
        if cfg.rotate:
            rep.rotation.copy_(torch.from_numpy(basis.T))
    if rep.num_bytes() >= table.num_bytes():
        return Skip(f"the pruned table takes {rep.num_bytes()} bytes >= the table's {table.num_bytes()}")
    counts_seen = ctx.counts(site.name)
    lost = float((f * tail[np.arange(rows), np.asarray(levels)[choice]]).sum())
    notes = {"levels": list(levels), "rows_per_level": counts.tolist(),
             "kept_values_share": float(np.asarray(levels)[choice].sum() / (rows * d)),
             "remap_dtype": rep.remap_dtype, "remap_bytes": rep.remap.numel() * rep.remap.element_size(),
             "rotation_bytes": 4 * d * d if cfg.rotate else 0,
             "weighted_rel_error": math.sqrt(lost / max(1e-300, float((f * (weight ** 2).sum(1)).sum())))}
    if counts_seen is not None:
        share = np.bincount(choice, weights=counts_seen, minlength=len(levels)) / max(1, counts_seen.sum())
        notes["lookup_share_per_level"] = share.tolist()
    return Rewrite(rep, notes=notes)
