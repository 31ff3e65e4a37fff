"""AmxMlp (targets/native/amx_mlp.py): the AMX-tile MLP against bf16 emulated in fp32 and the fp32 MLP."""

import pytest
import torch
from torch import nn

from rewrite.core.model import mlp
from targets.native.amx_mlp import amx_missing, pack
from targets.native.fast_kernels import padded_layers
from tests.tolerances import assert_close

pytestmark = pytest.mark.skipif(amx_missing() is not None, reason=f"AMX: {amx_missing()}")


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def emulated(layers, x: torch.Tensor) -> torch.Tensor:
    """The kernel's numerics in fp32: bf16 inputs and weights, fp32 sums, each output rounded."""
    h = bf16(x)
    for w, b, relu in layers:
        y = h @ bf16(w).t() + b
        h = bf16(y.relu() if relu else y)
    return h


def test_pack_layout():
    n, k = torch.meshgrid(torch.arange(20), torch.arange(40), indexing="ij")   # N = 20, K = 40: both padded
    w = ((7 * n + 3 * k) % 255 + 1).float()                                     # distinct, exact in bf16
    p = pack(w)
    assert p.shape == (2, 2, 16, 16, 2)
    for nt, kb, r, c, q in ((0, 0, 0, 0, 0), (0, 1, 3, 5, 1), (1, 0, 7, 3, 0), (1, 1, 3, 3, 1), (1, 1, 4, 3, 0)):
        n, k = 16 * nt + c, 32 * kb + 2 * r + q
        assert p[nt, kb, r, c, q] == (w[n, k] if n < 20 and k < 40 else 0)


@pytest.mark.parametrize("batch", [1, 31, 32, 33, 300])
@pytest.mark.parametrize("widths, relu_last, k_in", [([13, 512, 256, 64, 16], True, None),
                                                     ([24, 40, 8], False, None),
                                                     ([367, 512, 256, 1], False, 384)])
def test_amx_mlp_matches_emulated_bf16_and_fp32(batch, widths, relu_last, k_in):
    from targets.native.amx_mlp import AmxMlp

    torch.manual_seed(batch)
    net = mlp(widths, relu_last).eval()
    layers = padded_layers(net, k_in)
    fast = AmxMlp(layers)
    x = nn.functional.pad(torch.randn(batch, widths[0]), (0, (k_in or widths[0]) - widths[0]))
    with torch.inference_mode():
        for xin in (x, x.to(torch.bfloat16)):          # bf16 with K % 32 == 0: read in place
            y = fast(xin)
            assert y.shape == (batch, widths[-1])
            if fast.final:
                assert y.dtype == torch.float32
                hidden = emulated(layers[:-1], x)       # the logit: an fp32 dot of bf16 activations
                ref = hidden @ layers[-1][0].reshape(-1) + layers[-1][1]
                assert_close(y.squeeze(1), ref, "amx-logit-vs-emulated", f"{widths} B={batch} {xin.dtype}")
            else:
                assert y.dtype == torch.bfloat16
                assert_close(y.float(), emulated(layers, x), "bf16-vs-emulated", f"{widths} B={batch} {xin.dtype}")
            assert_close(y.float(), net(x[:, :widths[0]]), "bf16-mlp-vs-fp32", f"{widths} B={batch} {xin.dtype}")


def test_amx_mlp_refuses_bad_input():
    from targets.native.amx_mlp import AmxMlp

    fast = AmxMlp(padded_layers(mlp([13, 32, 16], True).eval()))
    with pytest.raises(RuntimeError, match=r"x must be \[B, 13\]"):
        fast(torch.zeros(4, 12))
    with pytest.raises(RuntimeError, match="x must be f32 or bf16"):
        fast(torch.zeros(4, 13, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="packed weight must be"):
        from targets.native.amx_mlp import kernels

        kernels().AmxMlp([torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(16)], [True], [16], 13,
                         torch.empty(0), 0.0)
