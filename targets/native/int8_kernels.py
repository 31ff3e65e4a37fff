"""int8 MLPs on ``torch._int_mm`` (oneDNN s8 x s8 -> s32, VNNI) with fused C++ prologue/epilogue.

Before: ``nn.Sequential`` of fp32 Linear + ReLU.  After, per Linear l with N_l % 8 == 0:
    W_l ≈ diag(sw_l) Q_l          Q_l int8 [N_l, K_l] per output channel, sw_l = max|W_l row| / 127
    x   ≈ diag(sa) q              per row (per sample) of the activations, sa = max|x row| / 127
    y   = relu((q Q_lᵀ) ⊙ sa swᵀ + b_l)  (int32 accumulation, exact), requantized per row for
          layer l+1 inside the same C++ loop (``dequant_act_quant``): activations between int8
          layers never exist in fp32 in memory.
K is zero-padded to a multiple of 8 (``_int_mm``'s shape rule).  Layers after the first whose
N is not a multiple of 8 (the top MLP's N = 1 output) stay fp32.  The kernels
(``kernels/dlrm_int8.cpp``) build at first use as a torch C++ extension (-O3 -march=native -fopenmp-simd,
cached by torch under TORCH_EXTENSIONS_DIR); ``unavailable()`` says why when they cannot.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from rewrite.core.errors import RewriteError
from targets.native.cpp_extension import build

ALIGN = 8                      # _int_mm needs K and N multiples of 8


def pad_to(k: int, align: int = ALIGN) -> int:
    return -(-k // align) * align


@functools.lru_cache(maxsize=None)
def int_mm_inexact() -> str | None:
    """Why ``torch._int_mm`` is not exact s8 x s8 -> s32 in this process, or None when it is: with
    oneDNN capped at AVX2 (``REWRITE_ISA=avx2`` on this AMD host) its int8 path sums u8 x s8 pairs
    in saturating s16 and drifts from the integer result.  A probe on random int8 operands."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (64, 256), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (256, 64), dtype=torch.int8, generator=g)
    got = torch._int_mm(a, b)
    if torch.equal(got, (a.long() @ b.long()).int()):
        return None
    return "torch._int_mm is not exact integer arithmetic in this process (a saturating int8 path)"


def kernels():
    """The compiled ``kernels/dlrm_int8.cpp`` (built once per source version and machine)."""
    return build("dlrm_rewrite_int8", "dlrm_int8.cpp")


def linears(mlp: nn.Sequential) -> list[tuple[nn.Linear, bool]]:
    """(Linear, followed by ReLU) for each layer of an MLP built by ``rewrite.core.model.mlp``."""
    mods = list(mlp)
    out = []
    for k, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            out.append((m, k + 1 < len(mods) and isinstance(mods[k + 1], nn.ReLU)))
        elif not isinstance(m, nn.ReLU):
            raise RewriteError(f"int8 MLP: unsupported layer {type(m).__name__} (Linear and ReLU only)")
    return out


class Int8Linear(nn.Module):
    """Per-output-channel int8 weights [Kp, N] (transposed for ``_int_mm``), fp32 scales and bias."""

    def __init__(self, linear: nn.Linear, relu: bool):
        super().__init__()
        w = linear.weight.detach().to(torch.float32)
        n, k = w.shape
        self.k, self.kp, self.n, self.relu = k, pad_to(k), n, relu
        scale = (w.abs().amax(1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.zeros(n, self.kp, dtype=torch.int8)
        q[:, :k] = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight_t", q.t())       # [Kp, N], column-major (oneDNN's fast layout)
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", linear.bias.detach().to(torch.float32).contiguous())


class Int8Mlp(nn.Module):
    """An MLP whose leading layers (N % 8 == 0, ReLU after) run in int8; the rest in fp32.

    ``forward(x)`` from fp32; ``from_quant(q, s)`` from an input already quantized per row to
    [B, Kp] (the fused interaction's output).
    """

    def __init__(self, mlp: nn.Sequential):
        super().__init__()
        layers = linears(mlp)
        n_int8 = 0
        while n_int8 < len(layers) and layers[n_int8][0].out_features % ALIGN == 0 and (
                layers[n_int8][1] or n_int8 == len(layers) - 1):
            n_int8 += 1
        if n_int8 == 0:
            raise RewriteError("int8 MLP: the first layer's width is not a multiple of 8")
        self.int8 = nn.ModuleList(Int8Linear(lin, relu) for lin, relu in layers[:n_int8])
        rest: list[nn.Module] = []
        for lin, relu in layers[n_int8:]:
            rest += [lin, nn.ReLU()] if relu else [lin]
        self.rest = nn.Sequential(*rest)
        self.kp = self.int8[0].kp
        kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_quant(*kernels().quantize_rows(x.contiguous(), self.kp))

    def from_quant(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        ops = kernels()
        last = len(self.int8) - 1
        for k, layer in enumerate(self.int8):
            acc = torch._int_mm(q, layer.qweight_t)
            if k < last:
                q, s = ops.dequant_act_quant(acc, s, layer.scale, layer.bias, self.int8[k + 1].kp)
            else:
                y = ops.dequant_act(acc, s, layer.scale, layer.bias, layer.relu)
        return self.rest(y)


def split_final(mlp: nn.Sequential) -> tuple[list[tuple[nn.Linear, bool]], nn.Linear | None]:
    """(the int8 layers, the width-1 last layer without ReLU that runs as an fp32 dot product, or
    None): ``linears(mlp)`` with that last layer split off when there is one after a hidden layer."""
    layers = linears(mlp)
    last, relu_last = layers[-1]
    if last.out_features == 1 and not relu_last and len(layers) > 1:
        return layers[:-1], last
    return layers, None


class OneCallInt8Mlp(nn.Module):
    """An int8 MLP run as one C++ call (``VnniMlp``, ``Avx2Int8Mlp``): the layers before a width-1
    last layer in int8 (``Int8Linear`` weights), that last layer an fp32 dot product.  A subclass
    names its kernel family (``name``), says why it cannot run (``missing``) and builds the C++
    object from the int8 layers (``build``).  ``forward(x f32 [B, K])``, ``from_quant(q s8 [B, kp],
    s [B])`` -> f32 [B, N_last] ([B, 1] after a width-1 last layer): ``Int8Mlp``'s contract."""

    name = "int8 MLP"

    def __init__(self, mlp: nn.Sequential):
        super().__init__()
        why = self.missing(mlp)
        if why:
            raise RewriteError(f"{self.name}: {why}")
        layers, last = split_final(mlp)
        self.final = last is not None
        final_w, final_b = torch.empty(0), 0.0
        if self.final:
            final_w, final_b = last.weight.detach().float().reshape(-1).contiguous(), float(last.bias.detach())
        int8 = [Int8Linear(lin, relu) for lin, relu in layers]
        self.kp = int8[0].kp
        self.mlp = self.build(int8, final_w, final_b)

    def missing(self, mlp: nn.Sequential) -> str | None:
        raise NotImplementedError

    def build(self, int8: list[Int8Linear], final_w: torch.Tensor, final_b: float):
        raise NotImplementedError

    def _shape(self, y: torch.Tensor) -> torch.Tensor:
        return y.unsqueeze(1) if self.final else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shape(self.mlp.forward(x.float().contiguous()))

    def from_quant(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self._shape(self.mlp.from_quant(q, s))


def int8_mlp_form(mlp: nn.Sequential | None = None) -> tuple[type[nn.Module], list[str]]:
    """The class ``int8_mlp`` builds for ``mlp`` at the active ISA tier (for an MLP of any shape the
    one-call kernels take when None), and why each form before it was passed over."""
    from targets.native.avx2_mlp import Avx2Int8Mlp, avx2_int8_missing, shape_missing as avx2_shape_missing
    from targets.native.vnni_mlp import VnniMlp, shape_missing as vnni_shape_missing, vnni_missing

    passed = []
    for form, process_missing, shape_missing in ((VnniMlp, vnni_missing, vnni_shape_missing),
                                                 (Avx2Int8Mlp, avx2_int8_missing, avx2_shape_missing)):
        why = process_missing() or (shape_missing(mlp) if mlp is not None else None)
        if why is None:
            return form, passed
        passed.append(f"{form.name}: {why}")
    return Int8Mlp, passed


def int8_mlp_wrong(mlp: nn.Sequential | None = None) -> str | None:
    """Why torch-fast-int8's MLP (``mlp``'s; when None, one of any shape) would compute wrong numbers
    in this process, or None: where it would be ``Int8Mlp`` and ``torch._int_mm`` is inexact
    (``int_mm_inexact``).  Exact ``_int_mm`` (the usual case) answers None without building anything."""
    inexact = int_mm_inexact()
    if inexact is None:
        return None
    form, passed = int8_mlp_form(mlp)
    if form is not Int8Mlp:
        return None
    return f"its int8 MLPs would be one torch._int_mm per layer ({'; '.join(passed)}), and {inexact}"


def int8_mlp(mlp: nn.Sequential) -> nn.Module:
    """torch-fast-int8's MLP for the active ISA tier: ``VnniMlp`` (one AVX512-VNNI call) where the
    process has VNNI, else ``Avx2Int8Mlp`` (one AVX2 call, the same numerics) at the avx2 tier,
    else ``Int8Mlp`` (one ``_int_mm`` per layer); a shape a kernel cannot take falls through to
    the next (``int8_mlp_form``).  Each: ``forward(x)``, ``from_quant(q, s)``, ``kp``.
    ``Int8Mlp`` is built even where ``_int_mm`` is inexact: the target refuses that case
    (``int8_mlp_wrong``), a speed probe (``rewrite.cost.microbench``) need not."""
    return int8_mlp_form(mlp)[0](mlp)
