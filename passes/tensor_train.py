"""Tensor-train embedding (TT-Rec, Yin et al., MLSys'21), fitted from the trained table.

Before: W [rows, d].
After:  cores G_k [p_k, r_{k-1}·q_k·r_k] (Πp >= rows, Πq = d, r_0 = r_K = 1) with
            W[i] ≈ vec(G_1[i_1] G_2[i_2] ... G_K[i_K])      (i_k the base-p digits of i)
        optionally an uncompressed cache C [K, d] of the hottest rows (TT-Rec's cache, chosen
        from the access profile) and optionally int8 row-wise cores (x ≈ scale·code + bias per
        core row, FBGEMM's int8 rule; to be replaced by the ``quantize`` pass's representation
        once it is merged).

Lookup: digits by truncating division, one gather per core, K-1 batched matmuls
([n, q_1, r_1] @ [n, r_1, q_2 r_2] -> [n, q_1 q_2, r_2] @ ...), cached rows swapped in with a
``where``, then ``pool``.  The cache index is a per-row slot map (-1 = not cached) or a sorted
id list searched by gathers (``passes.row_index``), whichever is smaller; its bytes count.

Fit (``passes.tt_fit``): TT-SVD of the zero-padded table, then frequency-weighted ALS.  Ranks:
given (``rank=``), the largest uniform rank meeting ``compression=``, or TT-SVD's δ-truncation
for ``max_error=`` (relative Frobenius error of the table; the pipeline re-checks it on bags).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from passes import tt_fit
from passes.row_index import (hottest_rows, narrow_tensor, padded_sorted_ids, sorted_lookup,
                               sorted_lookup_steps)
from rewrite.core.embedding import FusedLookup, Representation, pool, register_representation
from rewrite.core.pass_contract import PassContext, Rewrite, Selection, Skip, option, plain_fp32_table, register_pass
from rewrite.core.tracing import EmbeddingSite

DEFAULT_RANK = 16       # TT-Rec's Kaggle experiments use ranks 8-64 for 3 cores
INT8_LEVELS = 255       # 2^8 - 1 code steps (FBGEMM row-wise int8)


def rowwise_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, n] -> (codes uint8 [m, n], scale_bias fp32 [m, 2]): x ≈ codes·scale + bias,
    scale = (max - min)/255, bias = min per row (|error| <= scale/2)."""
    x = x.to(torch.float32)
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    scale = (hi - lo) / INT8_LEVELS
    codes = torch.where(scale > 0, torch.round((x - lo) / torch.where(scale > 0, scale, 1)), 0)
    return codes.clamp(0, INT8_LEVELS).to(torch.uint8), torch.cat([scale, lo], 1)


@register_representation("tt")
class TTBag(Representation):
    def __init__(self, rows: int, dim: int, p: list[int], q: list[int], ranks: list[int],
                 pooling: str = "sum", core_bits: int = 32, cache_rows: int = 0,
                 cache_index: str = "map", index_dtype: str = "int32"):
        super().__init__()
        self.rows, self.dim, self.pooling = int(rows), int(dim), pooling
        self.p, self.q, self.ranks = tuple(map(int, p)), tuple(map(int, q)), tuple(map(int, ranks))
        if math.prod(self.p) < self.rows or math.prod(self.q) != self.dim:
            raise ValueError(f"tt shapes p={self.p} q={self.q} do not cover {self.rows}x{self.dim}")
        self.core_bits, self.cache_rows, self.cache_index = int(core_bits), int(cache_rows), cache_index
        self.index_dtype = index_dtype
        for k, (pk, r0, qk, r1) in enumerate(tt_fit.core_shapes(self.p, self.q, self.ranks)):
            if self.core_bits == 32:
                self.register_parameter(f"core{k}", nn.Parameter(torch.empty(pk, r0 * qk * r1)))
            else:
                self.register_buffer(f"codes{k}", torch.empty(pk, r0 * qk * r1, dtype=torch.uint8))
                self.register_buffer(f"scale_bias{k}", torch.empty(pk, 2))
        if self.cache_rows:
            self.cache = nn.Parameter(torch.empty(self.cache_rows, self.dim))
            n = self.rows if cache_index == "map" else 1 << max(0, (self.cache_rows - 1).bit_length())
            self.register_buffer("cache_ids", torch.empty(n, dtype=getattr(torch, index_dtype)))

    def _core_rows(self, k: int, digit: torch.Tensor) -> torch.Tensor:
        if self.core_bits == 32:
            return getattr(self, f"core{k}").index_select(0, digit)
        codes = getattr(self, f"codes{k}").index_select(0, digit).to(torch.float32)
        sb = getattr(self, f"scale_bias{k}").index_select(0, digit)
        return codes * sb[:, 0:1] + sb[:, 1:2]

    def tt_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows [n, d] of the TT product (no cache)."""
        r = (1, *self.ranks, 1)
        rest, digits = indices, []
        for k in range(len(self.p) - 1):
            base = math.prod(self.p[k + 1:])
            d = torch.div(rest, base, rounding_mode="trunc")
            digits.append(d)
            rest = rest - d * base
        digits.append(rest)
        x = self._core_rows(0, digits[0]).reshape(-1, self.q[0], r[1])
        width = self.q[0]
        for k in range(1, len(self.p)):
            g = self._core_rows(k, digits[k]).reshape(-1, r[k], self.q[k] * r[k + 1])
            width *= self.q[k]
            x = torch.bmm(x, g).reshape(-1, width, r[k + 1])
        return x.reshape(-1, self.dim)

    def forward(self, indices, offsets):
        rows = self.tt_rows(indices)
        if self.cache_rows:
            if self.cache_index == "map":
                slot = self.cache_ids.index_select(0, indices).to(torch.int64)
                hit = slot >= 0
            else:
                slot, hit = sorted_lookup(self.cache_ids, indices)
            cached = self.cache.index_select(0, slot.clamp(0, self.cache_rows - 1))
            rows = torch.where(hit.unsqueeze(1), cached, rows)
        return pool(rows, offsets, self.pooling)

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "p": list(self.p), "q": list(self.q),
                "ranks": list(self.ranks), "pooling": self.pooling, "core_bits": self.core_bits,
                "cache_rows": self.cache_rows, "cache_index": self.cache_index,
                "index_dtype": self.index_dtype}

    def fused_lookup(self) -> FusedLookup:
        """Cores contracted per lookup, the cache (and its index) consulted first."""
        cores = tuple((getattr(self, f"core{k}").detach(), None) if self.core_bits == 32
                      else (getattr(self, f"codes{k}"), getattr(self, f"scale_bias{k}")) for k in range(len(self.p)))
        return FusedLookup("tt", self.dim, cores=cores, tt_shape=(self.p, self.q, self.ranks),
                           cache=self.cache.detach() if self.cache_rows else None,
                           remap=self.cache_ids if self.cache_rows else None,
                           cache_sorted=self.cache_index != "map")

    def core_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for n, t in self.state_dict().items()
                   if not n.startswith("cache"))

    def _core_row_bytes(self) -> list[int]:
        r = (1, *self.ranks, 1)
        per = 4 if self.core_bits == 32 else 1
        extra = 0 if self.core_bits == 32 else 8
        return [r[k] * self.q[k] * r[k + 1] * per + extra for k in range(len(self.p))]

    def bytes_per_lookup(self):
        """One row of every core (+ the cache index probes and a cached row when cached)."""
        out = sum(self._core_row_bytes())
        if self.cache_rows:
            probes = 1 if self.cache_index == "map" else sorted_lookup_steps(self.cache_ids.numel())
            out += probes * self.cache_ids.element_size() + self.dim * 4
        return float(out)

    def flops_per_lookup(self):
        r = (1, *self.ranks, 1)
        flops, width = 0, self.q[0]
        for k in range(1, len(self.p)):
            flops += 2 * width * r[k] * self.q[k] * r[k + 1]
            width *= self.q[k]
        if self.core_bits != 32:
            flops += 2 * sum(r[k] * self.q[k] * r[k + 1] for k in range(len(self.p)))
        return float(flops + self.dim)

    def describe(self):
        bits = "" if self.core_bits == 32 else f" int{self.core_bits} cores"
        cache = f" +cache {self.cache_rows} rows ({self.cache_index})" if self.cache_rows else ""
        return f"tt {self.rows}x{self.dim} p={self.p} q={self.q} ranks={self.ranks}{bits}{cache}"

    @classmethod
    def from_cores(cls, cores: list[torch.Tensor], rows: int, dim: int, pooling: str = "sum",
                   core_bits: int = 32, cache: tuple[np.ndarray, torch.Tensor] | None = None,
                   cache_index: str = "map") -> "TTBag":
        """Build from fitted cores [p_k, r_{k-1}, q_k, r_k] and an optional (row ids, rows) cache."""
        p = [c.shape[0] for c in cores]
        q = [c.shape[2] for c in cores]
        ranks = [c.shape[3] for c in cores[:-1]]
        ids = np.sort(cache[0]) if cache is not None else np.zeros(0, dtype=np.int64)
        index = None
        if len(ids):
            if cache_index == "map":
                slots = np.full(rows, -1, dtype=np.int64)
                slots[ids] = np.arange(len(ids))
                index = narrow_tensor(slots)
            else:
                index = padded_sorted_ids(ids)
        rep = cls(rows, dim, p, q, ranks, pooling, core_bits, len(ids), cache_index,
                  str(index.dtype).removeprefix("torch.") if index is not None else "int32")
        with torch.no_grad():
            for k, c in enumerate(cores):
                flat = c.reshape(c.shape[0], -1)
                if core_bits == 32:
                    getattr(rep, f"core{k}").copy_(flat.to(torch.float32))
                else:
                    codes, sb = rowwise_int8(flat)
                    getattr(rep, f"codes{k}").copy_(codes)
                    getattr(rep, f"scale_bias{k}").copy_(sb)
            if index is not None:
                order = np.argsort(cache[0])
                rep.cache.copy_(cache[1][torch.from_numpy(order)].to(torch.float32))
                rep.cache_ids.copy_(index)
        return rep


@dataclass(frozen=True)
class TTConfig(Selection):
    rank: tuple[int, ...] = option((), "one rank for every edge, or r_1..r_{K-1}")
    compression: float | None = option(None, "table bytes / tt bytes (cache and index included)")
    max_error: float | None = option(None, "relative Frobenius error of the table (TT-SVD δ)")
    p: tuple[int, ...] = option((), "row factors (Πp >= rows); default: balanced, 3 cores")
    q: tuple[int, ...] = option((), "dim factors (Πq = d); default: balanced, 3 cores")
    sweeps: int = option(2, "ALS sweeps after TT-SVD (0: plain TT-SVD)")
    cache_rows: int = option(0, "hottest rows kept uncompressed")
    cache_coverage: float | None = option(None, "...or the fewest rows covering this share of lookups")
    cache_index: Literal["auto", "map", "sorted"] = option("auto", "auto: the smaller in bytes")
    core_bits: Literal[32, 8] = option(32, "8: int8 row-wise cores")

    def __post_init__(self):
        given = [n for n in ("rank", "compression", "max_error") if getattr(self, n) not in ((), None)]
        if len(given) > 1:
            raise ValueError(f"give at most one of rank, compression, max_error (got {', '.join(given)})")
        if any(r < 1 for r in self.rank):
            raise ValueError("rank entries must be >= 1")
        if self.compression is not None and self.compression <= 1:
            raise ValueError(f"compression must be > 1 (table bytes / tt bytes), got {self.compression}")
        if self.max_error is not None and not 0 < self.max_error < 1:
            raise ValueError(f"max_error must be in (0, 1), got {self.max_error}")
        if self.p and self.q and len(self.p) != len(self.q):
            raise ValueError(f"p and q need the same number of factors (got {len(self.p)} and {len(self.q)})")
        k = len(self.p or self.q) or 3
        if (self.p or self.q) and k < 2:
            raise ValueError("p and q need at least 2 factors")
        if any(x < 1 for x in (*self.p, *self.q)):
            raise ValueError("p and q factors must be >= 1")
        if len(self.rank) not in (0, 1, k - 1):
            raise ValueError(f"rank takes 1 or {k - 1} values for {k} cores, got {len(self.rank)}")
        if self.sweeps < 0 or self.cache_rows < 0:
            raise ValueError("sweeps and cache_rows must be >= 0")
        if self.cache_coverage is not None and not 0 < self.cache_coverage <= 1:
            raise ValueError(f"cache_coverage must be in (0, 1], got {self.cache_coverage}")
        if self.cache_rows and self.cache_coverage is not None:
            raise ValueError("give cache_rows or cache_coverage, not both")


def _cache_index(rows: int, cached: int, mode: str) -> tuple[str, int]:
    """(index kind, its bytes) for a cache of ``cached`` rows: per-row slot map or sorted ids."""
    map_bytes = rows * narrow_tensor(np.array([-1, max(0, cached - 1)])).element_size()
    sorted_bytes = 4 * (1 << max(0, (cached - 1).bit_length()))
    if mode == "auto":
        mode = "map" if map_bytes <= sorted_bytes else "sorted"
    return mode, (map_bytes if mode == "map" else sorted_bytes)


def _core_bytes(p, q, ranks, core_bits: int) -> int:
    shapes = tt_fit.core_shapes(p, q, ranks)
    if core_bits == 32:
        return sum(4 * pk * r0 * qk * r1 for pk, r0, qk, r1 in shapes)
    return sum(pk * (r0 * qk * r1 + 8) for pk, r0, qk, r1 in shapes)


def _ranks_for_budget(p, q, budget: int, core_bits: int) -> tuple[int, ...] | None:
    """The largest uniform rank whose cores fit ``budget`` bytes (None: not even rank 1)."""
    best = None
    for r in range(1, max(tt_fit.max_ranks(p, q)) + 1):
        ranks = tt_fit.valid_ranks(p, q, (r,) * (len(p) - 1))
        if _core_bytes(p, q, ranks, core_bits) > budget:
            break
        best = ranks
    return best


@register_pass("tt", TTConfig)
def tensor_train(site: EmbeddingSite, cfg: TTConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 tables -> tensor-train cores (TT-SVD + frequency-weighted ALS), optional hot-row cache."""
    table = plain_fp32_table(site, ctx, "tt")
    if isinstance(table, Skip):
        return table
    k = len(cfg.p or cfg.q) or 3
    p = cfg.p or tt_fit.factor_rows(site.rows, k)
    q = cfg.q or tt_fit.factor_dim(site.dim, k)
    if math.prod(p) < site.rows:
        return Skip(f"p={','.join(map(str, p))} covers {math.prod(p)} rows < the table's {site.rows}")
    if math.prod(q) != site.dim:
        return Skip(f"q={','.join(map(str, q))} multiplies to {math.prod(q)}, not the table's dim {site.dim}")
    weight = table.weight.detach()
    counts = ctx.counts(site.name)
    cached = np.zeros(0, dtype=np.int64)
    if cfg.cache_rows or cfg.cache_coverage is not None:
        if counts is None:
            return Skip("cache_rows / cache_coverage need an access profile (rewrite profile -o)")
        cached = hottest_rows(counts, cfg.cache_rows, cfg.cache_coverage)
    index_kind, index_bytes = _cache_index(site.rows, len(cached), cfg.cache_index)
    cache_bytes = (len(cached) * site.dim * 4 + index_bytes) if len(cached) else 0
    weights = torch.from_numpy(ctx.row_weights(site.name, site.rows))
    weights[torch.from_numpy(cached)] = 0.0          # cached rows are served exactly
    if cfg.max_error is not None:
        cores = tt_fit.tt_svd(weight, p, q, eps=cfg.max_error)
        ranks = tuple(c.shape[3] for c in cores[:-1])
    else:
        if cfg.compression is not None:
            budget = table.num_bytes() / cfg.compression - cache_bytes
            ranks = _ranks_for_budget(p, q, int(budget), cfg.core_bits)
            if ranks is None:
                return Skip(f"compression={cfg.compression:g} leaves {max(0, int(budget))} bytes for "
                            f"the cores; rank 1 takes {_core_bytes(p, q, (1,) * (k - 1), cfg.core_bits)}")
        else:
            ranks = tt_fit.valid_ranks(p, q, cfg.rank * (k - 1) if len(cfg.rank) == 1
                                       else cfg.rank or (DEFAULT_RANK,) * (k - 1))
        cores = tt_fit.tt_svd(weight, p, q, ranks)
    err_svd = tt_fit.weighted_error(weight, weights, cores)
    cores = tt_fit.als(weight, weights, cores, cfg.sweeps)
    err_als = tt_fit.weighted_error(weight, weights, cores)
    rep = TTBag.from_cores(cores, site.rows, site.dim, site.pooling, cfg.core_bits,
                           (cached, weight[torch.from_numpy(cached)]) if len(cached) else None, index_kind)
    if rep.num_bytes() >= table.num_bytes():
        return Skip(f"tt at ranks {ranks} takes {rep.num_bytes()} bytes >= the table's {table.num_bytes()}")
    notes = {"p": list(p), "q": list(q), "ranks": list(ranks), "core_bits": cfg.core_bits,
             "weighted_error_tt_svd": err_svd, "weighted_error_als": err_als,
             "core_bytes": rep.core_bytes(), "cache_rows": len(cached), "cache_bytes": cache_bytes}
    if cfg.core_bits != 32:
        deq = [rep._core_rows(i, torch.arange(c.shape[0])).reshape(c.shape).double()
               for i, c in enumerate(cores)]
        notes["weighted_error_quantized"] = tt_fit.weighted_error(weight, weights, deq)
    if len(cached):
        notes["cache_index"] = index_kind
        notes["cache_lookup_share"] = float(counts[cached].sum() / max(1, counts.sum()))
    return Rewrite(rep, notes=notes)
