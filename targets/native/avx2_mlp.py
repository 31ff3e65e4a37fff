"""Whole int8 MLPs in one C++ call on AVX2 (``kernels/mlp_int8_avx2.cpp``): torch-fast-int8's MLPs
on CPUs without AVX512-VNNI (the avx2 ISA tier).

The weights and the numerics of ``targets.native.vnni_mlp.VnniMlp`` exactly (int8 per output
channel; s8 signed inputs, u8 after a ReLU, exact s32 sums): only the instructions change.  Both
operands are widened to s16 and multiplied by VPMADDWD (exact; VPMADDUBSW's saturating s16 pair
sums would overflow with u8 activations).  Layer widths must be multiples of 8 (one 8-lane vector
of output columns); ``avx2_int8_missing`` says why a process cannot use it.
"""

from __future__ import annotations

import torch
from torch import nn

from targets.native.cpp_extension import build, usable_or_why
from targets.native.int8_kernels import OneCallInt8Mlp, split_final

TILE_N = 8                   # output columns per AVX2 vector: every int8 layer's width is a multiple


def kernels():
    """The compiled ``kernels/mlp_int8_avx2.cpp``."""
    return build("dlrm_rewrite_int8_avx2", "mlp_int8_avx2.cpp")


def avx2_int8_missing() -> str | None:
    """Why this process cannot run the AVX2 int8 kernels, or None when it can."""
    return usable_or_why(lambda: kernels().avx2_usable(), "avx2", "fma")


def shape_missing(mlp: nn.Sequential) -> str | None:
    """Why ``Avx2Int8Mlp`` cannot take this MLP's shape, or None."""
    bad = [lin.out_features for lin, _ in split_final(mlp)[0] if lin.out_features % TILE_N]
    return f"layer widths {bad} are not multiples of {TILE_N}" if bad else None


def pack(q: torch.Tensor) -> torch.Tensor:
    """Q s8 [N, Kp] -> s16 [N/8, Kp/2, 8, 2], element [nt, k2, c, j] = Q[8 nt + c, 2 k2 + j]: one
    32-byte vector per (8 columns, 2 inputs), VPMADDWD's weight operand."""
    n, kp = q.shape
    return q.reshape(n // TILE_N, TILE_N, kp // 2, 2).permute(0, 2, 1, 3).contiguous().to(torch.int16)


class Avx2Int8Mlp(OneCallInt8Mlp):
    """An MLP as one AVX2 call (``OneCallInt8Mlp``'s contract)."""

    name = "AVX2 int8 MLP"

    def missing(self, mlp: nn.Sequential) -> str | None:
        return avx2_int8_missing() or shape_missing(mlp)

    def build(self, int8, final_w, final_b):
        return kernels().Avx2Int8Mlp([pack(layer.qweight_t.t().contiguous()) for layer in int8],
                                     [layer.scale for layer in int8], [layer.bias for layer in int8],
                                     [layer.relu for layer in int8], [layer.n for layer in int8],
                                     int8[0].k, self.kp, final_w, final_b)
