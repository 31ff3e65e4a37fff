"""Mixed-dimension embedding (Ginart et al.; dlrm ``--md-flag``).

Before: W [rows, d].   After: E [rows, d_i] and a bias-free projection P [d, d_i] with
    e(bag) = (sum_i E[i]) Pᵀ,
the layout of dlrm's PrEmbeddingBag (``embs.weight``, ``proj.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from rewrite.embedding import Representation, pool, register_representation


@register_representation("md")
class MDBag(Representation):
    def __init__(self, rows: int, dim: int, inner_dim: int, pooling: str = "sum"):
        super().__init__()
        self.rows, self.dim, self.inner_dim, self.pooling = int(rows), int(dim), int(inner_dim), pooling
        self.weight = nn.Parameter(torch.empty(self.rows, self.inner_dim))
        self.proj = nn.Parameter(torch.empty(self.dim, self.inner_dim))

    def forward(self, indices, offsets):
        pooled = pool(self.weight.index_select(0, indices), offsets, self.pooling)
        return pooled @ self.proj.t()

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "inner_dim": self.inner_dim, "pooling": self.pooling}

    def bytes_per_lookup(self):
        return self.inner_dim * 4

    def flops_per_lookup(self):
        return float(self.inner_dim + 2 * self.dim * self.inner_dim)  # pool add + projection

    def describe(self):
        return f"md {self.rows}x{self.inner_dim} -> {self.dim}"
