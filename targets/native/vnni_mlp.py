"""Whole int8 MLPs in one C++ call on AVX512-VNNI (``kernels/dlrm_vnni.cpp``), torch-fast-int8's
MLPs where the CPU has VNNI.

Same weights as ``targets.native.int8_kernels.Int8Mlp`` (int8 per output channel); what changes is the
schedule and the hidden activations: ``Int8Mlp`` runs one ``torch._int_mm`` per layer and a
C++ epilogue over its [B, N] int32 result (at B=2048 on the AMD host, everything but the
``_int_mm`` calls was 0.52 of the bottom MLP's 1.36 ms and 0.66 of the top's 2.18); here 48 samples at a time go through every layer with
their activations in L1/L2, the epilogue on the accumulators in registers.  Inputs after a
ReLU are quantized to u8 (scale max / 255: the sign bit is free), signed inputs to s8 shifted
by 128 with the column sums subtracted (VPDPBUSD multiplies u8 by s8).  A width-1 last layer
is an fp32 dot product.  ``vnni_missing`` says why a process cannot use it.
"""

from __future__ import annotations

import torch
from torch import nn

from targets.native.cpp_extension import build, usable_or_why
from targets.native.int8_kernels import OneCallInt8Mlp, split_final

TILE_N = 16                  # output columns per VNNI vector: every int8 layer's width is a multiple


def kernels():
    """The compiled ``kernels/dlrm_vnni.cpp``."""
    return build("dlrm_rewrite_vnni", "dlrm_vnni.cpp")


def vnni_missing() -> str | None:
    """Why this process cannot run the VNNI kernels, or None when it can."""
    return usable_or_why(lambda: kernels().vnni_usable(), "avx512bw", "avx512_vnni")


def shape_missing(mlp: nn.Sequential) -> str | None:
    """Why ``VnniMlp`` cannot take this MLP's shape, or None."""
    bad = [lin.out_features for lin, _ in split_final(mlp)[0] if lin.out_features % TILE_N]
    return f"layer widths {bad} are not multiples of {TILE_N}" if bad else None


def pack(q: torch.Tensor) -> torch.Tensor:
    """Q s8 [N, Kp] -> [N/16, Kp/4, 16, 4], element [nt, k4, c, j] = Q[16 nt + c, 4 k4 + j]: one
    64-byte vector per (16 columns, 4 inputs), VPDPBUSD's weight operand."""
    n, kp = q.shape
    return q.reshape(n // TILE_N, TILE_N, kp // 4, 4).permute(0, 2, 1, 3).contiguous()


class VnniMlp(OneCallInt8Mlp):
    """An MLP as one AVX512-VNNI call (``OneCallInt8Mlp``'s contract)."""

    name = "VNNI MLP"

    def missing(self, mlp: nn.Sequential) -> str | None:
        return vnni_missing() or shape_missing(mlp)

    def build(self, int8, final_w, final_b):
        qs = [layer.qweight_t.t().contiguous() for layer in int8]             # [N, Kp]
        return kernels().VnniMlp([pack(q) for q in qs], [layer.scale for layer in int8],
                                 [layer.bias for layer in int8],
                                 [(128 * q.to(torch.int32).sum(1)).to(torch.int32) for q in qs],
                                 [layer.relu for layer in int8], [layer.n for layer in int8],
                                 int8[0].k, self.kp, final_w, final_b)
