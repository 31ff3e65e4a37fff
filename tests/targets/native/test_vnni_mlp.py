"""``kernels/dlrm_vnni.cpp`` (torch-fast-int8's MLPs on AVX512-VNNI) against an exact-integer
reference of its numerics, built from the tests' own weight quantization
(``tests.targets.checks.ref_quantize_weight``; ``Int8Linear``'s buffers equal it, see
test_int8_kernels), and against fp32, on batch sizes around its 48-sample blocks."""

import pytest
import torch

from rewrite.core.errors import RewriteError
from rewrite.core.model import mlp
from targets.native.avx2_mlp import Avx2Int8Mlp
from targets.native.int8_kernels import int8_mlp, kernels as int8_kernels
from targets.native.vnni_mlp import VnniMlp, shape_missing, vnni_missing
from tests.targets.checks import ref_int8_mlp
from tests.tolerances import assert_close

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(vnni_missing() is not None, reason=f"VNNI: {vnni_missing()}")]
SHAPES = {"bottom": lambda: mlp([13, 512, 256, 64, 16], relu_last=True),
          "top": lambda: mlp([367, 512, 256, 1], relu_last=False),
          # a hidden layer without ReLU: the next layer's input is signed again (s8 + 128)
          "hidden without ReLU": lambda: torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.Linear(32, 48),
                                                             torch.nn.ReLU(), torch.nn.Linear(48, 16))}


@pytest.mark.parametrize("shape", list(SHAPES))
@torch.no_grad()
def test_vnni_mlp_is_its_integer_math_and_close_to_fp32(shape):
    torch.manual_seed(len(shape))
    net = SHAPES[shape]()
    v = VnniMlp(net)
    k_in = net[0].in_features
    for b in (1, 5, 47, 48, 49, 300):                                    # partial, whole and several blocks
        x = torch.randn(b, k_in) * torch.logspace(-2, 1, b)[:, None]
        x[0] = 0                                                         # an all-zero row: scale 1, no NaN
        got, ref, fp32 = v(x), ref_int8_mlp(net, x), net(x)
        peak = fp32.abs().max()                                          # compare relative to it
        assert_close(got / peak, ref / peak, "vnni-mlp-reference", f"{shape} B={b} vs integer reference")
        assert_close(got / peak, fp32 / peak, "int8-mlp-vs-fp32", f"{shape} B={b} vs fp32")
        q, s = int8_kernels().quantize_rows(x, v.kp)
        assert_close(v.from_quant(q, s), got, "exact", "from_quant vs forward")


@torch.no_grad()
def test_int8_mlp_takes_vnni_where_the_shape_fits_and_refuses_by_name():
    assert isinstance(int8_mlp(mlp([13, 512, 256, 64, 16], relu_last=True)), VnniMlp)
    odd = mlp([16, 24, 8], relu_last=True)
    assert shape_missing(odd) == "layer widths [24, 8] are not multiples of 16"
    assert isinstance(int8_mlp(odd), Avx2Int8Mlp)               # widths of 8: the AVX2 kernel takes it
    with pytest.raises(RewriteError, match="VNNI MLP: layer widths"):
        VnniMlp(odd)
    v = VnniMlp(mlp([13, 32, 16], relu_last=True))
    with pytest.raises(RuntimeError, match=r"x must be f32 \[B, 13\]"):
        v.mlp.forward(torch.zeros(3, 12))
    with pytest.raises(RuntimeError, match=r"q must be s8 \[B, 16\]"):
        v.from_quant(torch.zeros(3, 8, dtype=torch.int8), torch.ones(3))
