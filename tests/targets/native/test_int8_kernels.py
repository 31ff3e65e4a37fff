"""``kernels/dlrm_int8.cpp`` and ``Int8Mlp`` against references written in the tests
(``tests.targets.checks``): the per-row activation and per-channel weight quantization
(``Int8Linear``'s buffers equal the tests' own), the dequant epilogues, and a whole int8 MLP
against exact integer math built from the tests' own quantized weights, and against fp32."""

import pytest
import torch
from torch import nn

from rewrite.core.errors import RewriteError
from rewrite.core.model import mlp
from targets.native.int8_kernels import Int8Linear, Int8Mlp, kernels
from tests.targets.checks import ref_quantize, ref_quantize_weight
from tests.tolerances import assert_close, max_abs_diff

pytestmark = pytest.mark.slow      # the first test on a machine builds the C++ extension (~35 s)


@pytest.fixture(autouse=True)
def _no_grad():
    """Inference kernels: no autograd here, without leaking the switch into other test modules."""
    with torch.no_grad():
        yield


def test_int8_linear_buffers_are_the_reference_quantization():
    lin = nn.Linear(13, 24)                               # K = 13 pads to 16
    lin.weight[3] = 0                                     # an all-zero output channel
    lin.weight[5, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5])   # scale 1: ties go to even
    lin.weight[5, 5:] = 0
    layer = Int8Linear(lin, relu=True)
    codes, scale = ref_quantize_weight(lin.weight)
    assert codes.shape == (24, 16) and codes[5, :5].tolist() == [127, 0, 2, 2, 0] and (codes[:, 13:] == 0).all()
    assert torch.equal(layer.qweight_t, codes.t()) and (layer.k, layer.kp, layer.n) == (13, 16, 24)
    assert_close(layer.scale, scale, "exact", "per-channel weight scale")
    assert_close(layer.bias, lin.bias, "exact", "bias")


def test_quantize_rows_matches_reference_with_zero_rows_and_padding():
    x = torch.randn(37, 13) * torch.logspace(-3, 2, 37)[:, None]
    x[5] = 0
    q, s = kernels().quantize_rows(x, 16)
    rq, rs = ref_quantize(x, 16)
    assert_close(s, rs, "int8-row-scale", "activation scale")
    assert_close(q.int(), rq.int(), "int8-code", "activation codes")
    assert (q[:, 13:] == 0).all() and (q[5] == 0).all() and s[5] == 1
    assert (q.int().abs().amax(1)[torch.arange(37) != 5] == 127).all()


def test_dequant_kernels_match_reference():
    acc = torch.randint(-2**20, 2**20, (9, 24), dtype=torch.int32)
    sa, sw, b = torch.rand(9) * 1e-3, torch.rand(24) * 1e-3, torch.randn(24)
    y = acc.double() * sa[:, None].double() * sw[None].double() + b.double()
    assert_close(kernels().dequant_act(acc, sa, sw, b, False), y, "int8-dequant", "dequant")
    assert_close(kernels().dequant_act(acc, sa, sw, b, True), y.relu(), "int8-dequant", "dequant + relu")
    q, s = kernels().dequant_act_quant(acc, sa, sw, b, 32)
    rq, rs = ref_quantize(y.relu().float(), 32)
    assert_close(s, rs, "int8-row-scale", "requantized scale")
    assert_close(q.int(), rq.int(), "int8-code", "requantized codes")


def test_int8_mlp_is_exact_integer_math_and_close_to_fp32():
    from targets.native.int8_kernels import int_mm_inexact

    if int_mm_inexact():
        pytest.skip(int_mm_inexact())
    torch.manual_seed(0)
    top = mlp([367, 512, 256, 1], relu_last=False)
    first, second, last = (m for m in top if isinstance(m, nn.Linear))
    x = torch.randn(300, 367)
    q8 = Int8Mlp(top)
    assert len(q8.int8) == 2 and q8.rest[0] is last                      # the N=1 output stays fp32
    q, s = ref_quantize(x, 368)                                          # K = 367 pads to 368
    for lin, next_k in ((first, 512), (second, None)):
        codes, scale = ref_quantize_weight(lin.weight)
        acc = q.long() @ codes.long().t()                                # exact, as the s8 GEMM
        y = (acc.double() * s[:, None].double() * scale.double() + lin.bias.double()).relu().float()
        if next_k:
            q, s = ref_quantize(y, next_k)
    got, fp32 = q8(x), top(x)
    assert_close(got, last(y), "int8-mlp-reference", "int8 MLP vs exact integer reference")
    peak = fp32.abs().max()
    assert_close(got / peak, fp32 / peak, "int8-mlp-vs-fp32", "int8 MLP vs fp32")
    assert max_abs_diff(got, fp32) > 0                                   # it did run in int8


def test_refusals_name_the_problem():
    with pytest.raises(RewriteError, match="unsupported layer Dropout"):
        Int8Mlp(nn.Sequential(nn.Linear(8, 8), nn.Dropout()))
    with pytest.raises(RewriteError, match="first layer's width is not a multiple of 8"):
        Int8Mlp(mlp([16, 5, 8], relu_last=True))
    with pytest.raises(RuntimeError, match=r"x must be f32 \[M, K\]"):
        kernels().quantize_rows(torch.zeros(4, 4, dtype=torch.float64), 8)
