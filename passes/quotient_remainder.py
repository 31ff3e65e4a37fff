"""Quotient-remainder embedding (Shi et al., KDD'20; dlrm ``--qr-flag``).

Before: W [rows, d].   After: W_q [ceil(rows/c), d_p], W_r [c, d_p] with
    e(i) = op(W_q[i // c], W_r[i mod c]),  op in {mult, add, concat} (concat: d_p = d/2).

Two pooling semantics: ``pool_first=False`` pools e(i) over the bag (the exact table semantics,
what the fitted pass produces); ``pool_first=True`` pools W_q and W_r rows separately, then
combines, which is what dlrm's QREmbeddingBag computes (identical for one-id bags).  dlrm also
takes the quotient as ``(i / c).long()`` in float32 (``float_quotient``), equal to i // c below
2^24; we reproduce it when loading dlrm checkpoints.

Fit (pass ``qr``, post-training): minimise Σ_i w_i ||W_i - op(W_q[q_i], W_r[r_i])||² (w_i:
access frequency).  concat is separable: each half is the weighted mean of its rows.  add and
mult alternate exact block updates (each is a weighted least-squares problem with a closed form
per element):  add:  W_q[q] = Σ w_i (W_i - W_r[r_i]) / Σ w_i;
mult: W_q[q,k] = Σ w_i W[i,k] W_r[r_i,k] / Σ w_i W_r[r_i,k]²  (and symmetrically for W_r),
starting (mult) from each element's leading eigenvector of the c × c weighted Gram matrix of the
[ceil(rows/c), c] grid, exact for equal weights, or (add) from W_r = 0; no step raises the objective.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from passes.bucketing import BucketOptions
from rewrite.core.embedding import FusedLookup, Representation, f32_rows, pool, register_representation
from rewrite.core.pass_contract import PassContext, Rewrite, Skip, option, plain_fp32_table, register_pass
from rewrite.core.tracing import EmbeddingSite

ALS_MAX_ITERATIONS = 200
ALS_TOLERANCE = 1e-9          # stop when the objective improves by less than this fraction


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

    def fused_lookup(self) -> FusedLookup | None:
        """Q and S rows combined per lookup; None for dlrm's float32 quotient (eager computes it)."""
        if self.float_quotient:
            return None
        return FusedLookup("qr", self.weight_q.shape[1], f32_rows(self.weight_q),
                           second=self.weight_r.detach().contiguous(),
                           qr=(self.collisions, self.op, self.pool_first))


def _grid(weight: torch.Tensor, w: np.ndarray, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows laid out as [Q, c, d] (row i at (i // c, i mod c)), weights [Q, c, 1]; padding has
    weight 0."""
    rows, d = weight.shape
    q = -(-rows // c)
    x = nn.functional.pad(weight.detach().to(torch.float64), (0, 0, 0, q * c - rows)).view(q, c, d)
    wt = nn.functional.pad(torch.from_numpy(w).to(torch.float64), (0, q * c - rows)).view(q, c, 1)
    return x, wt


def _ratio(num: torch.Tensor, den: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else ``keep`` (a row no weighted lookup constrains)."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), keep)


def _rank_one_start(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """W_r's start for mult: per element k, the leading eigenvector of the c × c Gram matrix of
    the √w-scaled grid column [Q, c] (the exact answer when all weights are equal)."""
    s = x * wt.sqrt()
    gram = torch.einsum("qrk,qsk->krs", s, s)
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, :, -1].t().contiguous()


def fit_qr(weight: torch.Tensor, w: np.ndarray, c: int, op: str, pooling: str = "sum") -> tuple["QRBag", int]:
    """Frequency-weighted least-squares QR form of ``weight`` [rows, d]; returns (module, sweeps)."""
    rows, d = weight.shape
    x, wt = _grid(weight, w, c)
    sweeps = 0
    if op == "concat":
        h = d // 2
        wq = _ratio((wt * x[:, :, :h]).sum(1), wt.sum(1), torch.zeros(1, dtype=torch.float64))
        wr = _ratio((wt * x[:, :, h:]).sum(0), wt.sum(0), torch.zeros(1, dtype=torch.float64))
    else:
        wr = _rank_one_start(x, wt) if op == "mult" else torch.zeros(c, d, dtype=torch.float64)
        wq = torch.zeros(x.shape[0], d, dtype=torch.float64)
        last = None
        for sweeps in range(1, ALS_MAX_ITERATIONS + 1):
            if op == "mult":
                wq = _ratio((wt * x * wr).sum(1), (wt * wr ** 2).sum(1), wq)
                wr = _ratio((wt * x * wq[:, None]).sum(0), (wt * wq[:, None] ** 2).sum(0), wr)
                fit = wq[:, None] * wr
            else:
                wq = _ratio((wt * (x - wr)).sum(1), wt.sum(1), wq)
                wr = _ratio((wt * (x - wq[:, None])).sum(0), wt.sum(0), wr)
                fit = wq[:, None] + wr
            loss = float((wt * (x - fit) ** 2).sum())
            if last is not None and last - loss <= ALS_TOLERANCE * max(last, 1e-300):
                break
            last = loss
    rep = QRBag(rows, d, c, op=op, pooling=pooling)
    rep.weight_q.data, rep.weight_r.data = wq.to(torch.float32), wr.to(torch.float32)
    return rep, sweeps


def qr_bytes(rows: int, dim: int, c: int, op: str) -> int:
    part = dim // 2 if op == "concat" else dim
    return 4 * (-(-rows // c) + c) * part


@dataclass(frozen=True)
class QRConfig(BucketOptions):
    op: Literal["mult", "add", "concat"] = option("mult", "how the two parts combine (dlrm --qr-operation)")


@register_pass("qr", QRConfig)
def qr(site: EmbeddingSite, cfg: QRConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 tables -> quotient-remainder W_q, W_r fitted by weighted least squares."""
    table = plain_fp32_table(site, ctx, "qr")
    if isinstance(table, Skip):
        return table
    if cfg.op == "concat" and site.dim % 2:
        return Skip(f"op=concat splits the dimension in halves; dim {site.dim} is odd")
    c = cfg.collisions
    if cfg.compression is not None:
        budget = int(table.num_bytes() / cfg.compression)
        c = collisions_for_budget(site.rows, site.dim, cfg.op, budget)
        if c is None:
            best = qr_bytes(site.rows, site.dim, _sqrt_collisions(site.rows), cfg.op)
            return Skip(f"qr's smallest form ({_sqrt_collisions(site.rows)} collisions) takes {best} bytes; "
                        f"compression={cfg.compression:g} of this {table.num_bytes()}-byte table allows {budget}")
    new = qr_bytes(site.rows, site.dim, c, cfg.op)
    if new >= table.num_bytes():
        return Skip(f"the qr form with {c} collisions ({new} B) is not smaller than "
                    f"the table ({table.num_bytes()} B)")
    rep, sweeps = fit_qr(table.weight, ctx.row_weights(site.name, site.rows), c, cfg.op, site.pooling)
    return Rewrite(rep, notes={"collisions": c, "op": cfg.op, "sweeps": sweeps})


def _sqrt_collisions(rows: int) -> int:
    """The c of qr's smallest form: ceil(rows / c) + c is least near c = sqrt(rows)."""
    return min((max(2, math.isqrt(rows)), max(2, math.isqrt(rows) + 1)), key=lambda c: -(-rows // c) + c)


def collisions_for_budget(rows: int, dim: int, op: str, budget: int) -> int | None:
    """The fewest collisions c >= 2 whose W_q + W_r fit ``budget`` bytes (the bytes fall with c up
    to sqrt(rows)); None if not even the smallest form fits."""
    for c in range(2, _sqrt_collisions(rows) + 1):
        if qr_bytes(rows, dim, c, op) <= budget:
            return c
    return None
