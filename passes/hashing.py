"""The hashing trick (Weinberger et al.), fitted post-training to a trained table (pass ``hash``).

Before: W [rows, d].   After: H [m, d], m = ceil(rows / collisions), and
    e(i) = H[h(i)],   h(i) = ((a · (i mod p) + b) mod p) mod m,   p = 2^31 - 1,
a universal hash (Carter-Wegman) with 1 <= a < p, 0 <= b < p drawn from the seed, computed by
``passes.universal_hash`` (no int64 overflow for any id; ``torch.remainder`` only, which ONNX
and TVM lower exactly -- a trunc-division form of mod was exported by the dynamo exporter through
floating point and gave out-of-range buckets in onnxruntime).

Fit: minimise Σ_i w_i ||W_i - H[h(i)]||² (w_i: access frequency): each bucket is the weighted
mean of the rows hashed into it (a bucket no row maps to stays zero).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from passes.bucketing import BucketOptions
from passes.universal_hash import PRIME, universal_hash
from rewrite.core.embedding import FusedLookup, Representation, f32_rows, gather_pool, register_representation
from rewrite.core.pass_contract import PassContext, Rewrite, Skip, plain_fp32_table, register_pass
from rewrite.core.tracing import EmbeddingSite

MERSENNE_31 = PRIME           # the hash family's prime p = 2^31 - 1


@register_representation("hash")
class HashBag(Representation):
    def __init__(self, rows: int, dim: int, buckets: int, a: int, b: int, pooling: str = "sum"):
        super().__init__()
        if not (1 <= a < MERSENNE_31 and 0 <= b < MERSENNE_31):
            raise ValueError(f"hash parameters need 1 <= a < p and 0 <= b < p (p = 2^31 - 1), got a={a}, b={b}")
        self.rows, self.dim, self.pooling = int(rows), int(dim), pooling
        self.buckets, self.a, self.b = int(buckets), int(a), int(b)
        self.weight = nn.Parameter(torch.empty(self.buckets, self.dim))

    def bucket(self, indices: torch.Tensor) -> torch.Tensor:
        """h(i) for int64 ids i >= 0."""
        a, b = indices.new_full((1,), self.a), indices.new_full((1,), self.b)
        return universal_hash(indices, a, b, self.buckets)[:, 0]

    def forward(self, indices, offsets):
        return gather_pool(self.weight, self.bucket(indices), offsets, self.pooling)

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "buckets": self.buckets, "a": self.a, "b": self.b,
                "pooling": self.pooling}

    def bytes_per_lookup(self):
        return self.dim * 4

    def flops_per_lookup(self):
        return float(self.dim + 10)     # pool add + the hash's integer ops

    def describe(self):
        return f"hash {self.rows} -> {self.buckets}x{self.dim}"

    def fused_lookup(self) -> FusedLookup:
        return FusedLookup("hash", self.dim, f32_rows(self.weight), hash=(self.a, self.b, self.buckets))


def fit_hash(weight: torch.Tensor, w: np.ndarray, buckets: int, seed, pooling: str = "sum") -> HashBag:
    """Draw (a, b) from ``seed``; each bucket is the weighted mean of its rows."""
    rng = np.random.default_rng(seed)
    a, b = int(rng.integers(1, MERSENNE_31)), int(rng.integers(0, MERSENNE_31))
    rows, d = weight.shape
    rep = HashBag(rows, d, buckets, a, b, pooling)
    h = rep.bucket(torch.arange(rows, dtype=torch.int64))
    wt = torch.from_numpy(w).to(torch.float64)
    num = torch.zeros(buckets, d, dtype=torch.float64).index_add_(
        0, h, weight.detach().to(torch.float64) * wt.unsqueeze(1))
    den = torch.zeros(buckets, dtype=torch.float64).index_add_(0, h, wt)
    rep.weight.data = torch.where(den.unsqueeze(1) > 0, num / den.clamp(min=1e-300).unsqueeze(1), 0.0).to(torch.float32)
    return rep


@dataclass(frozen=True)
class HashConfig(BucketOptions):
    """Hashing trick: ``collisions`` ids per bucket on average."""


@register_pass("hash", HashConfig)
def hash_rows(site: EmbeddingSite, cfg: HashConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 tables -> hashing trick H[h(i)], buckets fitted as weighted means of their rows."""
    table = plain_fp32_table(site, ctx, "hash")
    if isinstance(table, Skip):
        return table
    if cfg.compression is not None:
        buckets = int(site.rows / cfg.compression)          # buckets · d · 4 <= table bytes / compression
        if buckets < 1:
            return Skip(f"compression={cfg.compression:g} of {site.rows} rows leaves less than one bucket")
    else:
        buckets = -(-site.rows // cfg.collisions)
    seed = [ctx.seed, zlib.crc32(site.name.encode())]     # stable, distinct per table
    rep = fit_hash(table.weight, ctx.row_weights(site.name, site.rows), buckets, seed, site.pooling)
    used = int(torch.unique(rep.bucket(torch.arange(site.rows))).numel())
    return Rewrite(rep, notes={"buckets": buckets, "buckets_used": used, "a": rep.a, "b": rep.b})
