"""One-hot GEMM lookup for small tables (MP-Rec's GEMM path for matrix engines without gather).

Before: W [rows, d], e(bag) = sum_{i in bag} W[i].
After:  the same W, e = C W with C [B, rows] the bag's id counts (a multi-hot row built by an
        equality against arange(rows) and a segment-sum): one GEMM, no gather of table rows.
Exact up to fp32 summation order; sensible only for small tables (C is B × rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rewrite.core.embedding import FusedLookup, Representation, f32_rows, register_representation, segment_sum
from rewrite.core.pass_contract import PassContext, Rewrite, Selection, Skip, option, plain_fp32_table, register_pass
from rewrite.core.tracing import EmbeddingSite


@register_representation("onehot")
class OneHotBag(Representation):
    def __init__(self, rows: int, dim: int, pooling: str = "sum"):
        super().__init__()
        self.rows, self.dim, self.pooling = int(rows), int(dim), pooling
        self.weight = nn.Parameter(torch.empty(self.rows, self.dim))
        self.register_buffer("row_ids", torch.arange(self.rows, dtype=torch.int64))

    def forward(self, indices, offsets):
        hot = (indices.unsqueeze(1) == self.row_ids.unsqueeze(0)).to(self.weight.dtype)
        counts = segment_sum(hot, offsets)
        if self.pooling == "mean":
            counts = counts / (offsets[1:] - offsets[:-1]).clamp(min=1).to(counts.dtype).unsqueeze(1)
        return counts @ self.weight

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "pooling": self.pooling}

    def bytes_per_lookup(self):
        return self.rows * self.dim * 4          # the GEMM streams the whole table per bag

    def flops_per_lookup(self):
        return float(self.rows + 2 * self.rows * self.dim)   # compare + one-hot row × W

    def describe(self):
        return f"onehot-gemm {self.rows}x{self.dim}"

    def fused_lookup(self) -> FusedLookup:
        """C W is the bag's sum of W's rows: a gather engine sums them."""
        return FusedLookup("rows", self.dim, f32_rows(self.weight))


@dataclass(frozen=True)
class OneHotConfig(Selection):
    max_rows: int = option(128, "leave tables with more rows alone (the one-hot matrix is B x rows)")

    def __post_init__(self):
        if self.max_rows < 1:
            raise ValueError("max_rows must be >= 1")

    def touches(self, *limits: str) -> str:
        return super().touches(f"at most {self.max_rows} rows", *limits)


@register_pass("onehot", OneHotConfig)
def onehot(site: EmbeddingSite, cfg: OneHotConfig, ctx: PassContext) -> Rewrite | Skip:
    """Small fp32 tables -> one-hot × table GEMM (exact; no gather)."""
    table = plain_fp32_table(site, ctx, "onehot")
    if isinstance(table, Skip):
        return table
    if site.rows > cfg.max_rows:
        return Skip(f"{site.rows} rows > max_rows={cfg.max_rows}")
    rep = OneHotBag(site.rows, site.dim, site.pooling)
    rep.weight.data = table.weight.detach().clone()
    return Rewrite(rep, error_bound=0.0)
