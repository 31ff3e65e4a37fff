import pytest
import torch
from torch import nn

from rewrite.core.errors import RewriteError
from rewrite.core.model import mlp
from targets.native.int8_kernels import Int8Mlp, kernels, pad_to
from tests.targets.checks import ref_quantize

pytestmark = pytest.mark.slow      # the first test on a machine builds the C++ extension (~35 s)


@pytest.fixture(autouse=True)
def _no_grad():
    """Inference kernels: no autograd here, without leaking the switch into other test modules."""
    with torch.no_grad():
        yield


def test_quantize_rows_matches_reference_with_zero_rows_and_padding():
    x = torch.randn(37, 13) * torch.logspace(-3, 2, 37)[:, None]
    x[5] = 0
    q, s = kernels().quantize_rows(x, 16)
    rq, rs = ref_quantize(x, 16)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert (q.int() - rq.int()).abs().max() <= 1          # x*inv vs x/s may differ by 1 ulp at .5
    assert (q[:, 13:] == 0).all() and (q[5] == 0).all() and s[5] == 1
    assert (q.int().abs().amax(1)[torch.arange(37) != 5] == 127).all()


def test_dequant_kernels_match_reference():
    acc = torch.randint(-2**20, 2**20, (9, 24), dtype=torch.int32)
    sa, sw, b = torch.rand(9) * 1e-3, torch.rand(24) * 1e-3, torch.randn(24)
    y = acc.float() * sa[:, None] * sw[None] + b
    torch.testing.assert_close(kernels().dequant_act(acc, sa, sw, b, False), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kernels().dequant_act(acc, sa, sw, b, True), y.relu(), rtol=1e-6, atol=1e-6)
    q, s = kernels().dequant_act_quant(acc, sa, sw, b, 32)
    rq, rs = ref_quantize(y.relu(), 32)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert (q.int() - rq.int()).abs().max() <= 1


def test_int8_mlp_is_exact_integer_math_and_close_to_fp32():
    torch.manual_seed(0)
    top = mlp([367, 512, 256, 1], relu_last=False)
    x = torch.randn(300, 367)
    q8 = Int8Mlp(top)
    assert len(q8.int8) == 2 and isinstance(q8.rest[0], nn.Linear)      # N=1 output stays fp32
    q, s = ref_quantize(x, 368)
    for k, layer in enumerate(q8.int8):
        acc = q.long() @ layer.qweight_t.long()
        y = (acc.double() * s[:, None].double() * layer.scale.double() + layer.bias.double()).relu().float()
        if k + 1 < len(q8.int8):
            q, s = ref_quantize(y, q8.int8[k + 1].kp)
    torch.testing.assert_close(q8(x), q8.rest(y), rtol=1e-4, atol=1e-5)
    err = (q8(x) - top(x)).abs().max() / top(x).abs().max()
    assert 0 < err < 0.03


def test_refusals_name_the_problem():
    with pytest.raises(RewriteError, match="unsupported layer Dropout"):
        Int8Mlp(nn.Sequential(nn.Linear(8, 8), nn.Dropout()))
    with pytest.raises(RewriteError, match="first layer's width is not a multiple of 8"):
        Int8Mlp(mlp([16, 5, 8], relu_last=True))
    with pytest.raises(RuntimeError, match=r"x must be f32 \[M, K\]"):
        kernels().quantize_rows(torch.zeros(4, 4, dtype=torch.float64), 8)
