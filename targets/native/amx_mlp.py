"""Whole MLPs in bf16 on AMX tiles, one C++ call per MLP (``kernels/dlrm_amx.cpp``).

y = MLP(x) with bf16 weights and layer inputs, f32 accumulation, bias and ReLU in f32, each
hidden activation rounded to bf16 once; a width-1 last layer is a f32 dot product (the logit is
not rounded).  These are ``OneDnnMlp``'s numerics; what changes is the schedule: 32 samples at a
time go through every layer with their activations in L1/L2, in one call.  B=2048 on the
Kaggle-shaped model: see docs/performance.md.  Where AMX is missing (CPU, kernel or compiler),
``amx_missing`` says why and torch-fast keeps ``OneDnnMlp``.
"""

from __future__ import annotations

import torch
from torch import nn

from rewrite.core.errors import RewriteError
from targets.native.cpp_extension import build, usable_or_why

AMX_FLAGS = ("-mamx-tile", "-mamx-bf16")


def kernels():
    """The compiled ``kernels/dlrm_amx.cpp``."""
    return build("dlrm_rewrite_amx", "dlrm_amx.cpp", AMX_FLAGS)


def amx_missing() -> str | None:
    """Why this process cannot run the AMX kernels, or None when it can."""
    return usable_or_why(lambda: kernels().amx_usable(), "amx_tile", "amx_bf16", "avx512_bf16")


def pack(w: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> bf16 B tiles [ceil(N/16), ceil(K/32), 16, 16, 2]: tile (nt, kb) element
    [r, c, q] = W[16 nt + c, 32 kb + 2 r + q], zero past N and K (TDPBF16PS's B operand)."""
    n, k = w.shape
    n_pad, k_pad = -(-n // 16) * 16, -(-k // 32) * 32
    w = nn.functional.pad(w.to(torch.float32), (0, k_pad - k, 0, n_pad - n))
    tiles = w.reshape(n_pad // 16, 16, k_pad // 32, 16, 2)          # [nt, c, kb, r, q]
    return tiles.permute(0, 2, 3, 1, 4).contiguous().to(torch.bfloat16)


class AmxMlp(nn.Module):
    """An MLP (``padded_layers`` form) as one AMX call: x f32 or bf16 [B, K] -> bf16 [B, N_last],
    or f32 [B, 1] when the last layer has width 1 and no ReLU (the ``OneDnnMlp`` contract)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor, bool]]):
        super().__init__()
        why = amx_missing()
        if why:
            raise RewriteError(why)
        w_last, b_last, relu_last = layers[-1]
        self.final = w_last.shape[0] == 1 and not relu_last and len(layers) > 1   # else y is [B, 1] bf16
        final_w, final_b = torch.empty(0), 0.0
        if self.final:
            layers, final_w, final_b = layers[:-1], w_last.reshape(-1), float(b_last)
        self.mlp = kernels().AmxMlp([pack(w) for w, _, _ in layers], [b for _, b, _ in layers],
                                    [r for _, _, r in layers], [w.shape[0] for w, _, _ in layers],
                                    layers[0][0].shape[1], final_w, final_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y.unsqueeze(1) if self.final else y
