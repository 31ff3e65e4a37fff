"""Row-wise quantization in FBGEMM's fused layouts, and fp16 tables (pass ``quantize``).

Before: W [rows, d] fp32.
After, bits=8:   packed uint8 [rows, d + 8], per row the codes, then fp32 scale and fp32 bias
                 (little-endian): scale = (max - min) / 255, bias = min,
                 q_j = rint((w_j - min) · 255 / (max - min + 1e-8))
                 (FBGEMM ``FloatOrHalfToFused8BitRowwiseQuantizedSBFloat``).
After, bits=4/2: packed uint8 [rows, ceil(d / k) + 4], k = 8 / bits codes per byte, code j in
                 bits (j mod k)·bits of byte j // k (low nibble first; an odd tail's unused high
                 bits are 0), then fp16 scale and fp16 bias: bias = fp16(min) rounded *before*
                 coding, scale = fp16((max - bias) / (2^b - 1)) (1 when that is 0),
                 q_j = clamp(rint((w_j - bias) / scale), 0, 2^b - 1)
                 (FBGEMM ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``): bytes match FBGEMM's.
After, bits=16:  ``TableBag`` with fp16 storage (round to nearest even), accumulated in fp32.
e(bag) = Σ_i (scale_i · q_i + bias_i).

Error bound per element per id (derived in ``_row_bounds``): within a row's coded range
[bias, bias + L·scale] (L = 2^b - 1) rounding costs at most min(scale/2, max - bias); fp16 rounding of the bias can
leave min below the bias (error bias - min) and of the scale can leave max above the top code
(error max - bias - L·scale); int8's 1e-8 in the inverse scale adds at most 1e-8.  The bound is
the max over rows.  fp16: |x - fp16(x)| <= 2^-11 |x| (2^-25 in the subnormal range).

The forward gathers packed rows, casts the bytes to fp32 and unpacks codes by floor division by
powers of two (exact in fp32); ONNX Runtime and TVM have no bitcast, so the scale and bias bytes are
decoded arithmetically from their IEEE fields, with 2^e taken from a 32-entry table of exact
powers of two (the ``exp_table`` buffer, 128 B, counted in ``num_bytes``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rewrite.core.mapped import abs_max, all_finite, indexed_blocks
from rewrite.core.embedding import Representation, RowStorage, TableBag, pool, register_representation
from rewrite.core.pass_contract import PassContext, Rewrite, Selection, Skip, option, plain_fp32_table, register_pass
from rewrite.core.tracing import EmbeddingSite

FBGEMM_EPSILON = 1e-8         # FBGEMM QuantUtils.cc, 8-bit: inverse scale = 255 / (range + kEpsilon)
FP16_MAX = 65504.0            # largest finite IEEE half
FP16_UNIT_ROUNDOFF = 2.0 ** -11
FP16_SUBNORMAL_STEP = 2.0 ** -24
# IEEE fields: (exponent bias + mantissa bits, mantissa bits) of fp32 and fp16.
_FORMATS = {4: (150, 23), 2: (25, 10)}
_EXP_TABLE_ENTRIES = 32


def code_bytes(dim: int, bits: int) -> int:
    per = 8 // bits
    return -(-dim // per)


def row_width(dim: int, bits: int) -> int:
    """Bytes per packed row: codes, then scale and bias (fp32 for 8 bits, fp16 below)."""
    return code_bytes(dim, bits) + (8 if bits == 8 else 4)


def _exp_table(nbytes: int) -> torch.Tensor:
    """[32] fp32: 2^(16h - shift + c) at h (0..15) and 2^(l - c) at 16 + l, so that
    table[h] · table[16 + l] = 2^(16h + l - shift) exactly, with every entry a normal float."""
    shift, _ = _FORMATS[nbytes]
    c = 30 if nbytes == 4 else 0
    hi = [2.0 ** (16 * h - shift + c) for h in range(16)]
    lo = [2.0 ** (l - c) for l in range(16)]
    return torch.tensor(hi + lo, dtype=torch.float32)


def decode_float(b: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Little-endian IEEE fp32 (b [..., 4]) or fp16 (b [..., 2]) byte values held as fp32 -> [...].

    value = (-1)^s · (2^m_bits·[e > 0] + mantissa) · 2^(max(e, 1) - bias - m_bits); every step is
    exact in fp32 (integers below 2^24, products of powers of two).  Inf/NaN never occur here.
    """
    nbytes = b.shape[-1]
    _, m_bits = _FORMATS[nbytes]
    top = b[..., nbytes - 1]
    sign = torch.floor(top * (1.0 / 128))
    top = top - 128 * sign
    if nbytes == 4:
        b2 = b[..., 2]
        e_low = torch.floor(b2 * (1.0 / 128))
        exponent = top * 2 + e_low
        mantissa = (b2 - 128 * e_low) * 65536 + b[..., 1] * 256 + b[..., 0]
    else:
        exponent = torch.floor(top * 0.25)
        mantissa = (top - 4 * exponent) * 256 + b[..., 0]
    lead = exponent.clamp(max=1.0) * float(2 ** m_bits)
    e = exponent.clamp(min=1.0)
    e_hi = torch.floor(e * (1.0 / 16))
    e_lo = e - 16 * e_hi
    index = torch.stack([e_hi, e_lo + 16], dim=-1).to(torch.int64)
    power = table.index_select(0, index.flatten()).view(index.shape)
    power = power[..., 0] * power[..., 1]
    return (1 - 2 * sign) * (lead + mantissa) * power


@register_representation("rowwise")
class RowwiseQuantizedBag(Representation):
    """Row-wise int8/int4/int2 table in FBGEMM's fused layout (one uint8 tensor ``packed``)."""

    def __init__(self, rows: int, dim: int, bits: int, pooling: str = "sum"):
        super().__init__()
        if bits not in (8, 4, 2):
            raise ValueError(f"rowwise bits must be 8, 4 or 2, got {bits}")
        self.rows, self.dim, self.bits, self.pooling = int(rows), int(dim), int(bits), pooling
        # every row is written by the fit or by loading: no zeroing pass over a table of GBs
        self.register_buffer("packed", torch.empty(self.rows, row_width(self.dim, self.bits), dtype=torch.uint8))
        self.register_buffer("exp_table", _exp_table(4 if self.bits == 8 else 2), persistent=False)

    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed rows [n, width] uint8 -> [n, dim] fp32."""
        b = rows.to(torch.float32)
        nc = code_bytes(self.dim, self.bits)
        scale_bias = decode_float(b[:, nc:].unflatten(1, (2, 4 if self.bits == 8 else 2)), self.exp_table)
        codes = b[:, :nc]
        if self.bits != 8:
            parts, step = [], float(2 ** self.bits)
            for _ in range(8 // self.bits - 1):
                rest = torch.floor(codes * (1.0 / step))
                parts.append(codes - step * rest)
                codes = rest
            codes = torch.stack([*parts, codes], dim=2).flatten(1)[:, :self.dim]
        return codes * scale_bias[:, 0:1] + scale_bias[:, 1:2]

    def forward(self, indices, offsets):
        return pool(self.dequantize(self.packed.index_select(0, indices)), offsets, self.pooling)

    def params(self):
        return {"rows": self.rows, "dim": self.dim, "bits": self.bits, "pooling": self.pooling}

    def row_storage(self) -> RowStorage:
        return RowStorage(f"int{self.bits}-rowwise", self.packed)

    def num_bytes(self):
        return self.packed.numel() + self.exp_table.numel() * 4

    def bytes_per_lookup(self):
        return float(row_width(self.dim, self.bits))

    def flops_per_lookup(self):
        unpack = 0 if self.bits == 8 else 3 * (8 // self.bits - 1) * code_bytes(self.dim, self.bits)
        decode = 2 * 14          # two IEEE decodes (scale, bias), ~14 elementwise ops each
        return float(2 * self.dim + self.dim + unpack + decode)   # multiply-add, pool add

    def describe(self):
        scale = "fp32" if self.bits == 8 else "fp16"
        return f"rowwise int{self.bits} {self.rows}x{self.dim} ({scale} scale+bias)"

    @classmethod
    def from_table(cls, weight: torch.Tensor, bits: int, pooling: str = "sum") -> tuple["RowwiseQuantizedBag", float]:
        """Quantize ``weight`` [rows, d] fp32; return the module and its error bound.  In row
        blocks (``rewrite.core.mapped.row_blocks``): every op is per row, so the result is the
        same, and the temporaries stay a block's size however large the table; each block by
        FBGEMM's kernel where it is installed (``quantize_block``)."""
        rep = cls(weight.shape[0], weight.shape[1], bits, pooling)
        bound = 0.0
        for lo, hi, block in indexed_blocks(weight.detach()):   # a mapped table's pages handed back
            rep.packed[lo:hi], block_bound = quantize_block(block.to(torch.float32).contiguous(), bits)
            bound = max(bound, block_bound)
        return rep, bound


def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, v)


def quantize_rows(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """FBGEMM's fused row-wise quantization of w [rows, d] fp32 (every op in fp32, as in C)."""
    rows, d = w.shape
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    levels = 2 ** bits - 1
    if bits == 8:
        rng = hi - lo
        scale, bias = rng / _f32(255.0, rng), lo
        inv = _f32(255.0, rng) / (rng + _f32(FBGEMM_EPSILON, rng))
        codes = torch.round((w - lo[:, None]) * inv[:, None])
        tail = [scale, bias]
    else:
        bias16 = lo.to(torch.float16)
        bias = bias16.to(torch.float32)
        rng = hi - bias
        scale = torch.where(rng == 0, _f32(1.0, rng), rng / _f32(float(levels), rng))
        scale = scale.to(torch.float16).to(torch.float32)
        scale = torch.where(scale == 0, _f32(1.0, scale), scale)
        inv = _f32(1.0, scale) / scale
        codes = torch.round((w - bias[:, None]) * inv[:, None]).clamp(0, levels)
        tail = [scale.to(torch.float16), bias16]
    codes = codes.to(torch.uint8)
    if bits != 8:
        per = 8 // bits
        codes = nn.functional.pad(codes, (0, code_bytes(d, bits) * per - d)).view(rows, -1, per)
        packed = torch.zeros(codes.shape[:2], dtype=torch.uint8)
        for k in range(per):
            packed |= codes[:, :, k] << (k * bits)
        codes = packed
    scale_bias = [t.contiguous().view(torch.uint8).view(rows, -1) for t in tail]
    bound = _row_bounds(lo, hi, scale, bias, levels, bits)
    return torch.cat([codes, *scale_bias], dim=1), bound


@functools.lru_cache(maxsize=None)
def fbgemm_quantizers():
    """``torch.ops.fbgemm`` where fbgemm-gpu-cpu is installed (its row-wise quantizers write the
    same bytes as ``quantize_rows``, 15-25x faster: 200k x 128 rows, int4, 0.025 vs 0.64 s on the
    AMD EPYC host), else None."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
    except Exception:        # not installed, or built for another torch: the torch ops serve
        return None
    return torch.ops.fbgemm


def row_min_max(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each row of w [rows, d]; NaN where a row has one.  ``amin`` and ``amax``
    separately: ``torch.aminmax(w, dim=1)`` was 6x slower than both together (500k x 128 fp32,
    one thread: 0.133 vs 0.022 s)."""
    return torch.amin(w, dim=1), torch.amax(w, dim=1)


def quantize_block(w: torch.Tensor, bits: int, fbgemm: bool = True,
                   row_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """``quantize_rows(w, bits)``'s bytes and bound, by FBGEMM's kernel where it is installed:
    the bound's inputs are read back from the packed rows (scale, bias) and the rows' (min, max)
    (``row_range``: ``row_min_max(w)`` when the caller has it, else one more pass)."""
    ops = fbgemm_quantizers() if fbgemm else None
    if ops is None or w.shape[0] == 0:
        return quantize_rows(w, bits)
    try:
        if bits == 8:
            packed = ops.FloatToFused8BitRowwiseQuantized(w)
        else:
            packed = ops.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    except RuntimeError:     # FBGEMM's n-bit kernel wants whole 2-byte units of codes (d = 8, 16, ...)
        return quantize_rows(w, bits)
    tail = packed[:, code_bytes(w.shape[1], bits):].contiguous()
    scale, bias = tail.view(torch.float32 if bits == 8 else torch.float16).to(torch.float32).unbind(1)
    lo, hi = row_min_max(w) if row_range is None else row_range
    return packed, _row_bounds(lo, hi, scale, bias, 2 ** bits - 1, bits)


def _row_bounds(lo, hi, scale, bias, levels: int, bits: int) -> float:
    lo, hi, scale, bias = (t.to(torch.float64) for t in (lo, hi, scale, bias))
    if bits == 8:
        per_row = scale / 2 + FBGEMM_EPSILON
    else:
        in_range = torch.minimum(scale / 2, hi - bias)       # a row narrower than scale/2 codes 0
        per_row = torch.maximum(in_range, torch.maximum(bias - lo, hi - bias - levels * scale))
    return float(per_row.max()) if per_row.numel() else 0.0


@dataclass(frozen=True)
class QuantizeConfig(Selection):
    bits: Literal[16, 8, 4, 2] = option(8, "16: fp16 table; 8: int8 codes + fp32 scale/bias per row; "
                                           "4, 2: packed codes + fp16 scale/bias per row (FBGEMM)")
    compression: float | None = option(None, "bytes ratio; when given it replaces bits: the most bits "
                                             "(16, 8, 4, 2) whose form is that much smaller, per table")

    def __post_init__(self):
        if self.bits not in (16, 8, 4, 2):
            raise ValueError(f"bits must be one of 16, 8, 4, 2 (got {self.bits})")
        if self.compression is not None and not self.compression > 1:
            raise ValueError(f"compression must be > 1, got {self.compression}")


def quantized_bytes(rows: int, dim: int, bits: int) -> int:
    """Stored bytes of the fp16 table (bits 16) or the packed row-wise form (8, 4, 2)."""
    return rows * dim * 2 if bits == 16 else rows * row_width(dim, bits) + _EXP_TABLE_ENTRIES * 4


def bits_for_compression(rows: int, dim: int, compression: float) -> int | None:
    """The most bits whose form takes at most fp32 bytes / ``compression`` (None: not even 2)."""
    budget = rows * dim * 4 / compression
    return next((b for b in (16, 8, 4, 2) if quantized_bytes(rows, dim, b) <= budget), None)


@torch.no_grad()
def _fit_rowwise(w: torch.Tensor, bits: int, pooling: str) -> tuple[RowwiseQuantizedBag | None, float, float]:
    """(module, bound, max |w|) from ONE read of ``w`` in row blocks, each block checked (finite;
    for int4/int2 within fp16's range), quantized, then its file pages released: a table mapped
    from its checkpoint is read once.  (None, 0, nan) on inf/nan, (None, 0, peak) beyond fp16."""
    rep = RowwiseQuantizedBag(w.shape[0], w.shape[1], bits, pooling)
    bound = peak = 0.0
    for lo, hi, mapped_block in indexed_blocks(w):
        block = mapped_block.to(torch.float32).contiguous()
        row_lo, row_hi = row_min_max(block)      # NaN propagates, inf is an extreme
        finite = bool(torch.isfinite(row_lo).all() and torch.isfinite(row_hi).all())
        peak = max(peak, float(torch.maximum(row_lo.abs(), row_hi.abs()).max())) if finite else float("nan")
        if not finite or (bits != 8 and peak > FP16_MAX):
            return None, 0.0, peak
        rep.packed[lo:hi], block_bound = quantize_block(block, bits, row_range=(row_lo, row_hi))
        bound = max(bound, block_bound)
    return rep, bound, peak


@register_pass("quantize", QuantizeConfig)
def quantize(site: EmbeddingSite, cfg: QuantizeConfig, ctx: PassContext) -> Rewrite | Skip:
    """fp32 tables -> fp16, or FBGEMM row-wise int8/int4/int2 (analytic error bound)."""
    table = plain_fp32_table(site, ctx, "quantize")
    if isinstance(table, Skip):
        return table
    w = table.weight.detach()
    bits = cfg.bits
    if cfg.compression is not None:
        bits = bits_for_compression(site.rows, site.dim, cfg.compression)
        if bits is None:
            return Skip(f"int2, the smallest form, takes {quantized_bytes(site.rows, site.dim, 2)} bytes; "
                        f"compression={cfg.compression:g} of this {table.num_bytes()}-byte table allows "
                        f"{int(table.num_bytes() / cfg.compression)}")
        cfg = dataclasses.replace(cfg, bits=bits, compression=None)
    if cfg.bits == 16:
        if not all_finite(w):
            return Skip("the table holds inf or nan values")
        peak = abs_max(w)
        if peak > FP16_MAX:
            return Skip(f"values up to {peak:.6g} exceed fp16's range ({FP16_MAX:g})")
        rep = TableBag(site.rows, site.dim, site.pooling, dtype="float16", weight=w)
        bound = max(peak * FP16_UNIT_ROUNDOFF, FP16_SUBNORMAL_STEP / 2)
        return Rewrite(rep, error_bound=bound, notes={"dtype": "float16"})
    new_bytes = quantized_bytes(site.rows, site.dim, cfg.bits)
    if new_bytes >= table.num_bytes():
        return Skip(f"the int{cfg.bits} form ({new_bytes} B) is not smaller than the table "
                    f"({table.num_bytes()} B)")
    rep, bound, peak = _fit_rowwise(w, cfg.bits, site.pooling)
    if rep is None and peak != peak:
        return Skip("the table holds inf or nan values")
    if rep is None:                         # below it, the scale, <= 2·peak/3, fits too
        return Skip(f"values up to {peak:.6g} exceed fp16's range ({FP16_MAX:g}), which "
                    f"int{cfg.bits}'s fp16 scale and bias need")
    return Rewrite(rep, error_bound=bound, notes={"bits": cfg.bits, "row_bytes": row_width(site.dim, cfg.bits)})
