"""Quotient-remainder embedding (Shi et al., KDD'20; dlrm ``--qr-flag``).

Before: W [rows, d].   After: W_q [ceil(rows/c), d_p], W_r [c, d_p] with
    e(i) = op(W_q[i // c], W_r[i mod c]),  op in {mult, add, concat} (concat: d_p = d/2).

Two pooling semantics: ``pool_first=False`` pools e(i) over the bag (the exact table semantics,
what the fitted pass produces); ``pool_first=True`` pools W_q and W_r rows separately, then
combines, which is what dlrm's QREmbeddingBag computes (identical for one-id bags).  dlrm also
takes the quotient as ``(i / c).long()`` in float32 (``float_quotient``), equal to i // c below
2^24; we reproduce it when loading dlrm checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from rewrite.embedding import Representation, pool, register_representation


@register_representation("qr")
class QRBag(Representation):
    def __init__(self, rows: int, dim: int, collisions: int, op: str = "mult", pooling: str = "sum",
                 pool_first: bool = False, float_quotient: bool = False):
        super().__init__()
        if op not in ("mult", "add", "concat"):
            raise ValueError(f"qr op must be mult, add or concat, got {op!r}")
        self.rows, self.dim, self.pooling = int(rows), int(dim), pooling
        self.collisions, self.op = int(collisions), op
        self.pool_first, self.float_quotient = bool(pool_first), bool(float_quotient)
        part = self.dim // 2 if op == "concat" else self.dim
        q_rows = -(-self.rows // self.collisions)
        self.weight_q = nn.Parameter(torch.empty(q_rows, part))
        self.weight_r = nn.Parameter(torch.empty(self.collisions, part))

    def split(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.float_quotient:
            q = (indices.to(torch.float32) / self.collisions).to(torch.int64)
        else:
            q = torch.div(indices, self.collisions, rounding_mode="trunc")
        return q, torch.remainder(indices, self.collisions)

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.op == "mult":
            return a * b
        if self.op == "add":
            return a + b
        return torch.cat([a, b], dim=1)

    def forward(self, indices, offsets):
        q, r = self.split(indices)
        eq, er = self.weight_q.index_select(0, q), self.weight_r.index_select(0, r)
        if self.pool_first:
            return self.combine(pool(eq, offsets, self.pooling), pool(er, offsets, self.pooling))
        return pool(self.combine(eq, er), offsets, self.pooling)

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "collisions": self.collisions, "op": self.op,
                "pooling": self.pooling, "pool_first": self.pool_first,
                "float_quotient": self.float_quotient}

    def bytes_per_lookup(self):
        return (self.weight_q.shape[1] + self.weight_r.shape[1]) * 4

    def flops_per_lookup(self):
        combine = 0 if self.op == "concat" else self.weight_q.shape[1]
        return float(combine + self.dim + (self.dim if self.pool_first else 0))

    def describe(self):
        return f"qr {self.op} c={self.collisions}: {tuple(self.weight_q.shape)} + {tuple(self.weight_r.shape)}"
