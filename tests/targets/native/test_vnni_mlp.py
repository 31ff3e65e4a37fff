"""``kernels/dlrm_vnni.cpp`` (torch-fast-int8's MLPs on AVX512-VNNI) against an exact-integer
reference of its numerics and against fp32, on batch sizes around its 48-sample blocks."""

import pytest
import torch

from rewrite.core.errors import RewriteError
from rewrite.core.model import mlp
from targets.native.int8_kernels import Int8Linear, Int8Mlp, kernels as int8_kernels, linears
from targets.native.vnni_mlp import VnniMlp, int8_mlp, shape_missing, split_final, vnni_missing
from tests.targets.checks import ref_quantize

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(vnni_missing() is not None, reason=f"VNNI: {vnni_missing()}")]
SHAPES = {"bottom": lambda: mlp([13, 512, 256, 64, 16], relu_last=True),
          "top": lambda: mlp([367, 512, 256, 1], relu_last=False),
          # a hidden layer without ReLU: the next layer's input is signed again (s8 + 128)
          "hidden without ReLU": lambda: torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.Linear(32, 48),
                                                             torch.nn.ReLU(), torch.nn.Linear(48, 16))}


def reference(net: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The kernel's math in int64 / f32 torch ops: s8 (+128) for signed inputs, u8 after a ReLU."""
    layers, last = split_final(net)
    h, signed = x, True
    for lin, relu in layers:
        layer = Int8Linear(lin, relu)
        if signed:
            a, s = ref_quantize(h, layer.kp)
        else:
            s = h.amax(1) / 255
            s = torch.where(s > 0, s, torch.ones_like(s))
            a = torch.floor(h / s[:, None] + 0.5).clamp(0, 255)
        acc = a.long() @ layer.qweight_t.long()                          # exact, as VPDPBUSD
        h = acc.float() * (s[:, None] * layer.scale[None]) + layer.bias
        h, signed = (h.relu(), False) if relu else (h, True)
    return h @ last.weight.detach().t() + last.bias.detach() if last is not None else h


@pytest.mark.parametrize("shape", list(SHAPES))
@torch.no_grad()
def test_vnni_mlp_is_its_integer_math_and_close_to_fp32(shape):
    torch.manual_seed(len(shape))
    net = SHAPES[shape]()
    v = VnniMlp(net)
    k_in = linears(net)[0][0].in_features
    for b in (1, 5, 47, 48, 49, 300):                                    # partial, whole and several blocks
        x = torch.randn(b, k_in) * torch.logspace(-2, 1, b)[:, None]
        x[0] = 0                                                         # an all-zero row: scale 1, no NaN
        got, ref, fp32 = v(x), reference(net, x), net(x)
        scale = fp32.abs().max()
        assert got.shape == fp32.shape
        assert (got - ref).abs().max() <= 1e-3 * scale                   # a rounding tie may flip one step
        assert (got - fp32).abs().max() <= 3e-2 * scale
        q, s = int8_kernels().quantize_rows(x, v.kp)
        torch.testing.assert_close(v.from_quant(q, s), got, atol=0, rtol=0)


@torch.no_grad()
def test_int8_mlp_takes_vnni_where_the_shape_fits_and_refuses_by_name():
    assert isinstance(int8_mlp(mlp([13, 512, 256, 64, 16], relu_last=True)), VnniMlp)
    odd = mlp([16, 24, 8], relu_last=True)
    assert shape_missing(odd) == "layer widths [24, 8] are not multiples of 16"
    assert isinstance(int8_mlp(odd), Int8Mlp)
    with pytest.raises(RewriteError, match="VNNI MLP: layer widths"):
        VnniMlp(odd)
    v = VnniMlp(mlp([13, 32, 16], relu_last=True))
    with pytest.raises(RuntimeError, match=r"x must be f32 \[B, 13\]"):
        v.mlp.forward(torch.zeros(3, 12))
    with pytest.raises(RuntimeError, match=r"q must be s8 \[B, 16\]"):
        v.from_quant(torch.zeros(3, 8, dtype=torch.int8), torch.ones(3))
