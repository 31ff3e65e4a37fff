"""The pieces of the ``torch-fast`` path: huge-page tables, the fused lookup + interaction kernel,
and bf16 MLPs on oneDNN with prepacked weights.

* ``TableStore``: what every table's fused lookup reads (``Representation.fused_lookup``: rows
  in f32, fp16 or FBGEMM's row-wise int8 / int4 / int2, each table in its own format; hash and
  QR index transforms, MD's and prune-dims' projections, hot-cold and prune-dims remaps)
  concatenated into one byte buffer allocated in 2 MiB pages (``madvise(MADV_HUGEPAGE)``), so a
  random lookup into a 2 GB table does not also miss the TLB; the kernels decode each row in
  registers.  Tables with no fused lookup (TT, DHE, hybrid, MEM-REC, ROBE, bf16) are ``pre``
  features: the engine pools them with their own ``forward`` and the kernels read the result;
* ``kernels()``: ``kernels/dlrm_fast.cpp`` (``gather_bags``, ``embed_interact``, ``final_dot``);
* ``fast_mlp``: the MLP form for the active ISA tier (``rewrite.core.isa``): ``targets.native.amx_mlp.AmxMlp``
  (the whole MLP in one call on AMX tiles) at the amx tier, ``OneDnnMlp`` in bf16 where the CPU
  computes in bf16 (AVX512-BF16), else ``OneDnnMlp`` in fp32 (on AVX2, bf16 is only a
  conversion cost, and torch's oneDNN bf16 linear refuses CPUs without avx512bw/vl/dq);
* ``OneDnnMlp``: y = relu(x Wᵀ + b) per layer as ``torch.ops.mkldnn._linear_pointwise`` with
  weights reordered once into oneDNN's blocked layout (bf16 on the AMD host at B=2048: top MLP
  1.15 ms prepacked vs 1.78 ms plain bf16 ``F.linear`` vs 9.8 ms fp32), bias and ReLU fused into
  the GEMM.  In bf16 a last layer of width 1 runs as ``final_dot`` in fp32 accumulation, so the
  logit is not rounded to bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rewrite.core import isa
from rewrite.core.embedding import FusedLookup, Representation
from rewrite.core.errors import RewriteError
from rewrite.core.batch import bucket_rows
from rewrite.core.mapped import expect_sequential, release
from targets.native.cpp_extension import build
from targets.native.int8_kernels import linears

PAIR_ORDERS = {"dlrm": 0, "dlrm-self": 1, "torchrec": 2}   # embed_interact's ``order`` codes


def kernels():
    """The compiled ``kernels/dlrm_fast.cpp`` (built once per source version and machine)."""
    return build("dlrm_rewrite_fast", "dlrm_fast.cpp")


FORMAT_CODES = {"f32": 0, "f16": 1, "int8-rowwise": 2, "int4-rowwise": 3, "int2-rowwise": 4}   # the kernels' fmt
KIND_CODES = {"rows": 0, "hash": 1, "qr": 2, "hotcold": 3, "pruned": 4, "pre": 5, "tt": 6}   # the kernels' kinds
QR_OPS = {"mult": 0, "add": 1, "concat": 2}
NCOL = 12      # columns of feat: kind, fmt, base, rows, width, mean, proj, P0 .. P4 (kernels/dlrm_fast/tables.h)


@dataclass(frozen=True)
class TableStore:
    """Tables in one huge-page byte buffer ``w``, as the kernels take them: ``feat`` int64
    [F, NCOL] says where and how feature f's rows lie in ``w`` (kind, format, byte offsets, the
    kind's parameters); ``d`` is the embedding dim.  A ``pre`` feature's bags come pooled."""

    w: torch.Tensor
    feat: torch.Tensor
    d: int

    def args(self) -> tuple:
        """(w, feat, d): the table arguments of every kernel, in their order (``pre`` follows)."""
        return self.w, self.feat, self.d


class _Buffer:
    """Byte blobs laid out 64-byte aligned, copied into one huge-page buffer at the end."""

    def __init__(self):
        self.parts: list[tuple[int, torch.Tensor]] = []
        self.total = 0

    def add(self, t: torch.Tensor) -> int:
        """Byte offset of ``t``'s bytes (a contiguous copy) in the buffer."""
        b = t.detach().contiguous().reshape(-1).view(torch.uint8)
        start = self.total
        self.parts.append((start, b))
        self.total += -(-b.numel() // 64) * 64
        return start

    def finish(self) -> torch.Tensor:
        w = kernels().huge_empty(self.total)
        for start, b in self.parts:
            expect_sequential(b)         # a table mapped from its file: read it front to back,
            w[start:start + b.numel()].copy_(b)
            release(b)                   # then hand its pages back (the copy is what serves)
        return w


def _feature_row(rep: Representation, lookup: FusedLookup | None, d: int, buf: _Buffer) -> list[int]:
    """feat's row for a table (``pre``: pooled by torch; its P0, the pre column, set per feature)."""
    row = [KIND_CODES["pre"], 0, 0, rep.rows, d, 0, -1, 0, 0, 0, 0, 0]
    if lookup is None:
        return row
    row[0] = KIND_CODES[lookup.kind]
    row[4], row[5] = lookup.width, int(rep.pooling == "mean")
    if lookup.rows is not None:
        row[1], row[2] = FORMAT_CODES[lookup.rows.format], buf.add(lookup.rows.rows)
    if lookup.project is not None:
        row[6] = buf.add(lookup.project.to(torch.float32))
    if lookup.kind == "hash":
        row[7:10] = lookup.hash
    elif lookup.kind == "qr":
        c, op, pool_first = lookup.qr
        row[7:11] = [c, buf.add(lookup.second.to(torch.float32)), QR_OPS[op], int(pool_first)]
    elif lookup.kind == "hotcold":
        row[7:12] = [buf.add(lookup.remap), lookup.remap.element_size(), buf.add(lookup.second.to(torch.float32)),
                     lookup.second.shape[0], lookup.rows.rows.shape[0]]
    elif lookup.kind == "pruned":
        levels = [[buf.add(b), b.shape[1], b.shape[0]] if b is not None and b.numel() else [0, 0, 0]
                  for b in lookup.blocks]
        row[7:12] = [buf.add(lookup.remap), lookup.remap.element_size(), lookup.offset_bits,
                     buf.add(torch.tensor(levels, dtype=torch.int64)), len(levels)]
    elif lookup.kind == "tt":
        row[7] = buf.add(_tt_table(lookup, buf))
    return row


def _tt_table(lookup: FusedLookup, buf: _Buffer) -> torch.Tensor:
    """A TT lookup's int64 table (``TtTable`` in kernels/dlrm_fast/tables.h): header, then one entry per core."""
    p, q, ranks = lookup.tt_shape
    r = (1, *ranks, 1)
    head = [len(p), 0, 0, 0, 0, 0, 0, 0]
    if lookup.cache is not None and lookup.cache.shape[0]:
        index = lookup.remap
        head[1:6] = [lookup.cache.shape[0], buf.add(lookup.cache.to(torch.float32)), buf.add(index),
                     0 if lookup.cache_sorted else index.element_size(), index.numel()]
    cores = []
    for k, (core, scale_bias) in enumerate(lookup.cores):
        bits = 32 if scale_bias is None else 8
        data = core.to(torch.float32) if bits == 32 else core
        sb = buf.add(scale_bias.to(torch.float32)) if bits == 8 else 0
        cores += [buf.add(data), p[k], q[k], r[k], r[k + 1], bits, sb, 0]
    return torch.tensor(head + cores, dtype=torch.int64)


def store_tables(tables: list[Representation], feature_tables: list[int], d: int) -> TableStore:
    """One buffer holding what every table's fused lookup reads (``Representation.fused_lookup``;
    each table once, 64-byte aligned), and per feature (``feature_tables[f]``: its table) the
    row of ``feat``; tables without a fused lookup become ``pre`` features, numbered in order."""
    buf = _Buffer()
    rows = [_feature_row(t, t.fused_lookup(), d, buf) for t in tables]
    feat, n_pre = [], 0
    for t in feature_tables:
        row = list(rows[t])
        if row[0] == KIND_CODES["pre"]:
            row[7], n_pre = n_pre, n_pre + 1
        feat.append(row)
    return TableStore(buf.finish(), torch.tensor(feat, dtype=torch.int64), d)


def onednn_missing() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn), so no fast bf16 GEMM on CPU"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build lacks mkldnn._linear_pointwise (fused bf16 linear)"
    return None


def bf16_gemm_missing() -> str | None:
    """Why bf16 MLPs would not pay here (no oneDNN, or a CPU without AVX512-BF16, where bf16 is
    a conversion cost and torch's oneDNN bf16 linear may refuse to run), or None."""
    return onednn_missing() or isa.missing("avx512bw", "avx512vl", "avx512dq", "avx512_bf16")


def padded_layers(mlp: nn.Sequential, k_in: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(W fp32 [N, K], b fp32 [N], ReLU after) per layer; the first W zero-padded to ``k_in`` columns."""
    out = []
    for k, (lin, relu) in enumerate(linears(mlp)):
        w = lin.weight.detach().to(torch.float32)
        if k == 0 and k_in is not None and k_in > w.shape[1]:
            w = nn.functional.pad(w, (0, k_in - w.shape[1]))
        out.append((w, lin.bias.detach().to(torch.float32).contiguous(), relu))
    return out


def bf16_pairs(w: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> P bf16 [ceil(K/2), N, 2], P[c, j, q] = W[j, 2c + q] (zero past K): the operand
    layout of AVX512-BF16's pairwise dot product."""
    n, k = w.shape
    w = nn.functional.pad(w, (0, k % 2))
    return w.t().reshape(-1, 2, n).permute(0, 2, 1).contiguous().to(torch.bfloat16)


def small_model(store: TableStore, bottom: nn.Sequential, top: nn.Sequential, n_dense: int, order: int, kp: int):
    """The whole model as one C++ object for tiny batches: ``small_model(...)(dense, indices,
    offsets, pre) -> logits``; MLP weights as ``bf16_pairs``, the top's first zero-padded to kp inputs."""
    b, t = padded_layers(bottom, n_dense), padded_layers(top, kp)
    return kernels().SmallModel(*store.args(), [bf16_pairs(w) for w, _, _ in b], [x for _, x, _ in b],
                                [bf16_pairs(w) for w, _, _ in t], [x for _, x, _ in t], [r for _, _, r in b],
                                [r for _, _, r in t], order, kp)


def fast_mlp(mlp: nn.Sequential, k_in: int | None = None) -> nn.Module:
    """The fastest form of an MLP at the active ISA tier: ``AmxMlp`` (one call, AMX tiles) where
    this process can use AMX, else ``OneDnnMlp`` in bf16 where the CPU computes in bf16, else in
    fp32.  Each takes f32 or bf16 [B, K_in] (``k_in``: zero-padded width); the bf16 forms
    compute the same numerics."""
    from targets.native.amx_mlp import AmxMlp, amx_missing

    layers = padded_layers(mlp, k_in)
    if amx_missing() is None and len(layers) > 1:     # AmxMlp needs a hidden layer to end on
        return AmxMlp(layers)
    return OneDnnMlp(mlp, k_in, torch.float32 if bf16_gemm_missing() else torch.bfloat16)


class OneDnnMlp(nn.Module):
    """An MLP of Linear (+ ReLU) layers on oneDNN in ``dtype`` (bf16 or fp32); input f32 or bf16
    [B, K_in] (converted to ``dtype``), output ``dtype``, or fp32 [B, 1] after a width-1 last layer.

    ``k_in`` zero-pads the first layer's weight columns to the width the caller's input has
    (the fused interaction writes [B, kp] with kp a multiple of 16).
    """

    def __init__(self, mlp: nn.Sequential, k_in: int | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        why = onednn_missing() or (bf16_gemm_missing() if dtype == torch.bfloat16 else None)
        if why:
            raise RewriteError(f"oneDNN {str(dtype).removeprefix('torch.')} MLP: {why}")
        self.dtype = dtype
        layers = padded_layers(mlp, k_in)
        w_last, b_last, relu_last = layers[-1]
        self.final = w_last.shape[0] == 1 and not relu_last and dtype == torch.bfloat16
        if self.final:
            layers = layers[:-1]
            self.w_final = w_last.reshape(-1).contiguous()
            self.b_final = float(b_last)
            self.final_dot = kernels().final_dot        # bound once, off the per-call path
        self.packed = [torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), None) for w, _, _ in layers]
        self.bias = [b.to(dtype) for _, b, _ in layers]
        self.attr = ["relu" if relu else "none" for _, _, relu in layers]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The layers before a width-1 last layer in bf16 (all layers otherwise), f32 or bf16 in,
        ``dtype`` out.  The rows are zero-padded to ``bucket_rows`` for oneDNN and the padding
        cut off again (rows are independent)."""
        m = x.shape[0]
        x, padded = x.to(self.dtype), bucket_rows(m)
        if padded != m:
            x = nn.functional.pad(x, (0, 0, 0, padded - m))
        for w, b, attr in zip(self.packed, self.bias, self.attr):
            x = torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], "")
        return x[:m]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.hidden(x)
        if self.final:
            return self.final_dot(y.contiguous(), self.w_final, self.b_final).unsqueeze(1)
        return y.to(torch.float32)

