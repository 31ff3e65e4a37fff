"""Quantized mixed dimension (pass ``mdq``): md's low-rank factor stored as column-quantized codes.

Before: W [rows, d] fp32.
After:  codes Q uint8, b = 8, 4 or 2 bits per value, low bits first: [rows, ceil(r·b / 8)] (each row
        starts a byte), or, when r·b is 2 or 4, k = 8 / (r·b) rows per byte ([ceil(rows / k), 1];
        row i in bits (i mod k)·r·b of byte i // k), per-column fp16 scale s [r] and bias c [r], and, when r < d, an fp16
        projection P [d, r]:
            E_i = Q_i ⊙ s + c,        e(bag) = (Σ_i E_i) Pᵀ     (no P when r = d: e = Σ_i E_i)
Fit: P = the frequency-weighted truncated SVD of md (``passes.mixed_dim.fit_md``), E = W P, then
per column j of E: (c_j, s_j) minimising Σ_i w_i (E_ij − c_j − s_j Q_ij)² (w: the row weights, access
frequency), Q = clamp(rint((E − c) / s), 0, 2^b − 1) (``fit_grid``: from min / max, where every row
is within half a step, the range is cut where that lowers the weighted error; at 2 bits min / max
lets a few rare extreme rows set a step of a third of the span for every row).
Bytes: rows · ceil(r·b / 8) (or ceil(rows / k)) + 4 r (+ 2 d r with P): the ratios multiply (md's d / r times fp32's
32 / b), with no per-row scale (row-wise int4 spends 4 of its 12 bytes per 16-dim row on one).

Recovery (``rewrite.recovery``) trains ``MDQTraining``, this form with fp32 masters of E
(quantization-aware: the forward rounds E to the codes it would store, gradients pass straight
through the rounding, and s, c, P train through their fp16 storage), then ``stored_form``
re-quantizes: the trained model and the stored one compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from passes.mixed_dim import energy_dim, fit_md, weighted_table
from rewrite.core.embedding import FusedLookup, Representation, f32_rows, pool, register_representation
from rewrite.core.pass_contract import PassContext, Rewrite, Selection, Skip, option, register_pass
from rewrite.core.tracing import EmbeddingSite

BITS = (8, 4, 2)


def packed_width(inner: int, bits: int) -> int:
    """Bytes per row of codes: ``inner`` values of ``bits`` bits, 8 / bits per byte."""
    return -(-inner * bits // 8)


def rows_per_byte(inner: int, bits: int) -> int:
    """k rows share a byte when a row's r·b bits divide 8 into k >= 2 parts, else 1."""
    rb = inner * bits
    return 8 // rb if rb < 8 and 8 % rb == 0 else 1


def code_shape(rows: int, inner: int, bits: int) -> tuple[int, int]:
    k = rows_per_byte(inner, bits)
    return (-(-rows // k), 1) if k > 1 else (rows, packed_width(inner, bits))


def mdq_bytes(rows: int, dim: int, inner: int, bits: int) -> int:
    """Stored bytes: codes, fp16 scale and bias per column, fp16 P [dim, inner] when inner < dim."""
    n, w = code_shape(rows, inner, bits)
    return n * w + 4 * inner + (2 * dim * inner if inner < dim else 0)


def split_values(x: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """fp32 integers [n, m] -> their ``count`` lowest b-bit fields each, [n, m, count] (floor
    division by 2^b: exact in fp32, exportable)."""
    parts, step = [], float(2 ** bits)
    for _ in range(count):
        rest = torch.floor(x * (1.0 / step))
        parts.append(x - step * rest)
        x = rest
    return torch.stack(parts, dim=2)


def unpack(codes: torch.Tensor, inner: int, bits: int) -> torch.Tensor:
    """uint8 [n, packed_width] -> fp32 code values [n, inner] (row-aligned layout)."""
    x = codes.to(torch.float32)
    if bits == 8:
        return x
    return split_values(x, 8 // bits, bits).flatten(1)[:, :inner]


def pack(q: torch.Tensor, bits: int, per_byte: int = 1) -> torch.Tensor:
    """int code values [n, inner] in [0, 2^bits) -> uint8 [n, packed_width] (low bits first), or
    with ``per_byte`` = k > 1 rows per byte, [ceil(n / k), 1] (row i at bits (i mod k)·inner·b)."""
    if per_byte > 1:
        return pack(q.reshape(1, -1), bits).reshape(-1, 1)
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    per = 8 // bits
    n, inner = q.shape
    q = nn.functional.pad(q, (0, packed_width(inner, bits) * per - inner)).view(n, -1, per)
    out = torch.zeros(q.shape[:2], dtype=torch.uint8)
    for k in range(per):
        out |= q[:, :, k] << (k * bits)
    return out


@register_representation("mdq")
class MDQBag(Representation):
    def __init__(self, rows: int, dim: int, inner_dim: int, bits: int = 4, pooling: str = "sum"):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"mdq bits must be 8, 4 or 2, got {bits}")
        if not 1 <= inner_dim <= dim:
            raise ValueError(f"mdq inner_dim must be in [1, {dim}], got {inner_dim}")
        self.rows, self.dim, self.inner_dim, self.bits, self.pooling = int(rows), int(dim), int(inner_dim), int(bits), pooling
        self.per_byte = rows_per_byte(self.inner_dim, self.bits)
        self.register_buffer("codes", torch.zeros(code_shape(self.rows, self.inner_dim, self.bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(self.inner_dim, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(self.inner_dim, dtype=torch.float16))
        self.projected = self.inner_dim < self.dim
        self.proj = nn.Parameter(torch.zeros(self.dim, self.inner_dim, dtype=torch.float16)) if self.projected else None

    def factor(self, ids: torch.Tensor) -> torch.Tensor:
        """E's rows of ``ids`` [n] -> [n, inner] fp32."""
        if self.per_byte == 1:
            q = unpack(self.codes.index_select(0, ids), self.inner_dim, self.bits)
        else:
            k = self.per_byte
            byte = self.codes.index_select(0, torch.div(ids, k, rounding_mode="floor")).to(torch.float32)
            slot = (ids - k * torch.div(ids, k, rounding_mode="floor")).to(torch.float32).unsqueeze(1)
            shifted = torch.floor(byte / torch.pow(2.0, slot * float(self.inner_dim * self.bits)))
            q = split_values(shifted, self.inner_dim, self.bits).flatten(1)
        return q * self.scale.float() + self.bias.float()

    def forward(self, indices, offsets):
        pooled = pool(self.factor(indices), offsets, self.pooling)
        return pooled @ self.proj.float().t() if self.projected else pooled

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "inner_dim": self.inner_dim, "bits": self.bits,
                "pooling": self.pooling}

    def bytes_per_lookup(self):
        return 1.0 if self.per_byte > 1 else float(packed_width(self.inner_dim, self.bits))

    def flops_per_lookup(self):
        unpack_ops = 0 if self.bits == 8 else 3 * (8 // self.bits - 1) * packed_width(self.inner_dim, self.bits)
        project = 2 * self.dim * self.inner_dim if self.projected else 0
        return float(3 * self.inner_dim + unpack_ops + project)     # scale-add, pool add, projection

    def describe(self):
        tail = f" -> {self.dim}" if self.projected else ""
        return f"mdq {self.rows}x{self.inner_dim} int{self.bits} (per-column fp16 scale+bias){tail}"

    def fused_lookup(self) -> FusedLookup:
        """The engine looks up E's rows decoded to fp32 (the same values the eager forward pools;
        its resident copy is fp32 [rows, inner], not the codes), projected after pooling."""
        rows = self.factor(torch.arange(self.rows))
        project = self.proj.detach().float().t().contiguous() if self.projected else None
        return FusedLookup("rows", self.inner_dim, f32_rows(rows), project=project)

    def training_form(self) -> "MDQTraining":
        return MDQTraining.from_stored(self)

    @classmethod
    def from_factor(cls, e: torch.Tensor, proj: torch.Tensor | None, dim: int, bits: int,
                    pooling: str = "sum", weights: np.ndarray | None = None) -> "MDQBag":
        """Quantize E [rows, inner] per column; ``proj`` [dim, inner] or None (inner = dim).  The
        range per column: min / max without ``weights`` [rows], else ``fit_grid``'s (clipped where
        that lowers the weighted squared error)."""
        rows, inner = e.shape
        rep = cls(rows, dim, inner, bits, pooling)
        e = e.detach().to(torch.float32)
        if weights is None or not rows:
            lo = e.min(dim=0).values if rows else torch.zeros(inner)
            hi = e.max(dim=0).values if rows else torch.zeros(inner)
            lo_h = lo.to(torch.float16)
            span = (hi - lo_h.float()) / (2 ** bits - 1)
        else:
            lo, span = fit_grid(e, weights, bits)
            lo_h = lo.to(torch.float16)
        rep.bias.copy_(lo_h)
        scale = span.to(torch.float16)
        rep.scale.copy_(torch.where(scale.float() > 0, scale, torch.ones_like(scale)))
        rep.codes.copy_(pack(quantize_codes(e, rep.scale.float(), rep.bias.float(), bits), bits, rep.per_byte))
        if proj is not None:
            rep.proj.data = proj.detach().to(torch.float16)
        return rep


def _grid_error(e: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, levels: int):
    """Per-column weighted squared error of E rounded to bias + scale · {0..levels}, and the codes."""
    q = torch.clamp(torch.round((e - bias) / scale), 0, levels)
    return (w * (e - bias - scale * q) ** 2).sum(0), q


def fit_grid(e: torch.Tensor, weights: np.ndarray, bits: int, steps: int = 16, sweeps: int = 30,
             max_rows: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column j of E [rows, r]: (c_j, s_j) lowering Σ_i w_i (E_ij − c_j − s_j q_ij)², q the
    rounded, clamped codes.  Min / max (every row within half a step) is the start; at 2 and 4
    bits rare extreme rows set the step for every row, so the range is searched: the lower and
    upper ends each cut by 0..½ of the span on a ``steps`` × ``steps`` grid, then alternating
    exact updates (codes by rounding, then (c, s) by weighted least squares on those codes), each
    kept only where it lowers the error: never worse than min / max.  Tables of more than
    ``max_rows`` rows are fitted on a seeded sample of that many rows (their weights kept)."""
    levels = 2 ** bits - 1
    e = e.detach()
    lo, hi = e.min(0).values.to(torch.float64), e.max(0).values.to(torch.float64)
    w = np.asarray(weights, dtype=np.float64)
    if e.shape[0] > max_rows:
        pick = np.sort(np.random.default_rng(0).choice(e.shape[0], max_rows, replace=False))
        e, w = e[torch.from_numpy(pick)], w[pick]
    x, w = e.to(torch.float64), torch.from_numpy(w).reshape(-1, 1)
    span = hi - lo
    ones = torch.ones_like(span)
    c, s = lo, torch.where(span > 0, span / levels, ones)
    best = _grid_error(x, w, c, s, levels)[0]
    cuts = torch.linspace(0.0, 0.5, steps, dtype=torch.float64)
    for a in cuts:
        for b in cuts:
            if a + b >= 0.95:                 # keep a step of at least 5% of the span
                continue
            cn, sn = lo + a * span, torch.where(span > 0, (1 - a - b) * span / levels, ones)
            err = _grid_error(x, w, cn, sn, levels)[0]
            m = err < best
            c, s, best = torch.where(m, cn, c), torch.where(m, sn, s), torch.where(m, err, best)
    q = _grid_error(x, w, c, s, levels)[1]
    total = w.sum()
    for _ in range(sweeps):
        sq, sqq, sx, sqx = (w * q).sum(0), (w * q * q).sum(0), (w * x).sum(0), (w * q * x).sum(0)
        det = total * sqq - sq ** 2
        sn = (total * sqx - sq * sx) / torch.where(det > 0, det, ones)
        cn = (sx - sn * sq) / total
        ok = (det > 0) & (sn > 0)
        cn, sn = torch.where(ok, cn, c), torch.where(ok, sn, s)
        err, qn = _grid_error(x, w, cn, sn, levels)
        m = err < best * (1 - 1e-12)
        if not bool(m.any()):
            break
        c, s, best, q = torch.where(m, cn, c), torch.where(m, sn, s), torch.where(m, err, best), torch.where(m, qn, q)
    return c.to(torch.float32), s.to(torch.float32)


def quantize_codes(e: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round((e - bias) / scale).clamp(0, 2 ** bits - 1)


class MDQTraining(Representation):
    """What recovery trains in place of an ``MDQBag``: E as fp32 ``weight`` rounded to its codes
    in the forward (straight-through), fp16 ``scale``, ``bias`` and ``proj``.  Not registered: it
    never leaves recovery (``stored_form`` turns it back)."""

    kind = "mdq-training"
    lr_scale = 0.1      # recovery's rate multiplier: 5e-3 at its 5e-2 default (MovieLens, 41.8x:
                        # test ΔAUC -0.0018 at 5e-3, -0.0033 at 5e-2; fitted -0.0027)

    def __init__(self, stored: MDQBag):
        super().__init__()
        self.rows, self.dim, self.pooling = stored.rows, stored.dim, stored.pooling
        self.inner_dim, self.bits, self.projected = stored.inner_dim, stored.bits, stored.projected
        self.weight = nn.Parameter(stored.factor(torch.arange(stored.rows)).detach().clone())
        self.scale = nn.Parameter(stored.scale.detach().clone())
        self.bias = nn.Parameter(stored.bias.detach().clone())
        self.proj = nn.Parameter(stored.proj.detach().clone()) if stored.projected else None

    @classmethod
    def from_stored(cls, stored: MDQBag) -> "MDQTraining":
        return cls(stored)

    def forward(self, indices, offsets):
        s, c = self.scale.float(), self.bias.float()
        x = (self.weight.index_select(0, indices) - c) / s
        q = x.clamp(0, 2 ** self.bits - 1)
        q = q + (torch.round(q) - q).detach()          # round, gradient straight through
        pooled = pool(q * s + c, offsets, self.pooling)
        return pooled @ self.proj.float().t() if self.projected else pooled

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "inner_dim": self.inner_dim, "bits": self.bits,
                "pooling": self.pooling}

    def stored_form(self) -> MDQBag:
        rep = MDQBag(self.rows, self.dim, self.inner_dim, self.bits, self.pooling)
        with torch.no_grad():
            scale = torch.where(self.scale.float() > 0, self.scale, torch.ones_like(self.scale))
            rep.scale.copy_(scale)
            rep.bias.copy_(self.bias)
            rep.codes.copy_(pack(quantize_codes(self.weight.float(), rep.scale.float(), rep.bias.float(), self.bits),
                                 self.bits, rep.per_byte))
            if self.projected:
                rep.proj.data = self.proj.detach().to(torch.float16).clone()
        return rep


@dataclass(frozen=True)
class MDQConfig(Selection):
    bits: int = option(4, "bits per stored value of the factor: 8, 4 or 2")
    energy: float = option(0.8, "keep the fewest dims holding this share of the frequency-weighted "
                                "spectrum (1: every dim, no projection)")
    inner_dim: int | None = option(None, "the factor's width r (replaces energy)")
    compression: float | None = option(None, "bytes ratio: r = the widest factor whose stored form fits "
                                             "table bytes / compression (replaces energy and inner_dim)")

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of 8, 4, 2 (got {self.bits})")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.inner_dim is not None and self.inner_dim < 1:
            raise ValueError(f"inner_dim must be >= 1, got {self.inner_dim}")
        if self.compression is not None:
            if not self.compression > 1:
                raise ValueError(f"compression must be > 1, got {self.compression}")
            if self.inner_dim is not None:
                raise ValueError("compression sizes inner_dim itself: give one of them")


def widest_fitting(rows: int, dim: int, bits: int, budget: float) -> int | None:
    """The largest r in [1, dim] whose mdq form takes at most ``budget`` bytes (None: not even r = 1)."""
    fits = [r for r in range(1, dim + 1) if mdq_bytes(rows, dim, r, bits) <= budget]
    return max(fits) if fits else None


@register_pass("mdq", MDQConfig)
def mdq(site: EmbeddingSite, cfg: MDQConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 tables -> low-rank factor (frequency-weighted SVD) stored as column-quantized codes."""
    fitted = weighted_table(site, ctx, "mdq")
    if isinstance(fitted, Skip):
        return fitted
    table, w, vals, vecs = fitted
    if cfg.compression is not None:
        budget = table.num_bytes() / cfg.compression
        inner, why = widest_fitting(site.rows, site.dim, cfg.bits, budget), f"compression {cfg.compression:g}"
        if inner is None:
            return Skip(f"mdq's smallest int{cfg.bits} form (r = 1) takes {mdq_bytes(site.rows, site.dim, 1, cfg.bits)} "
                        f"bytes; compression={cfg.compression:g} of this {table.num_bytes()}-byte table "
                        f"allows {int(budget)}")
    elif cfg.inner_dim is not None:
        inner, why = min(cfg.inner_dim, site.dim), f"inner_dim {cfg.inner_dim}"
    else:
        inner, why = energy_dim(vals, cfg.energy), f"energy {cfg.energy:g}"
    new_bytes = mdq_bytes(site.rows, site.dim, inner, cfg.bits)
    if new_bytes >= table.num_bytes():
        return Skip(f"{why} gives r={inner}, whose int{cfg.bits} mdq form ({new_bytes} B) is not smaller "
                    f"than the table ({table.num_bytes()} B)")
    if inner < site.dim:
        md = fit_md(table.weight, w, inner, site.pooling, vecs)
        rep = MDQBag.from_factor(md.weight.data, md.proj.data, site.dim, cfg.bits, site.pooling, w)
    else:
        rep = MDQBag.from_factor(table.weight, None, site.dim, cfg.bits, site.pooling, w)
    kept = float(vals[:inner].sum() / vals.sum()) if vals.sum() > 0 else 1.0
    return Rewrite(rep, notes={"inner_dim": inner, "bits": cfg.bits, "energy_kept": kept})
