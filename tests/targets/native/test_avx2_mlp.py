"""``kernels/mlp_int8_avx2.cpp`` (torch-fast-int8's MLPs at the avx2 ISA tier) against the exact
integer reference of the int8 MLP kernels' numerics (``tests.targets.checks.ref_int8_mlp``, built
from the tests' own weight quantization) and against fp32, at every tier that has AVX2, on batch
sizes around its 48-sample blocks; and ``int8_mlp``'s choice per tier."""

import pytest
import torch

from rewrite.core.errors import RewriteError
from rewrite.core.model import mlp
from targets.native.avx2_mlp import Avx2Int8Mlp, avx2_int8_missing, pack, shape_missing
from targets.native.int8_kernels import (Int8Mlp, int8_mlp, int8_mlp_form, int8_mlp_wrong, int_mm_inexact,
                                          kernels as int8_kernels)
from tests.targets.checks import ref_int8_mlp
from tests.tolerances import assert_close

pytestmark = pytest.mark.slow                     # builds an extension per tier (~30 s)
SHAPES = {"bottom": lambda: mlp([13, 512, 256, 64, 16], relu_last=True),
          "top": lambda: mlp([367, 512, 256, 1], relu_last=False),
          # a hidden layer without ReLU: the next layer's input is signed again
          "hidden without ReLU": lambda: torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.Linear(32, 48),
                                                             torch.nn.ReLU(), torch.nn.Linear(48, 8))}


@pytest.fixture
def avx2_tier(isa_tier):
    if avx2_int8_missing():
        pytest.skip(f"AVX2 int8: {avx2_int8_missing()}")
    return isa_tier


@pytest.mark.parametrize("shape", list(SHAPES))
@torch.no_grad()
def test_avx2_mlp_is_its_integer_math_and_close_to_fp32(avx2_tier, shape):
    torch.manual_seed(len(shape))
    net = SHAPES[shape]()
    m = Avx2Int8Mlp(net)
    k_in = net[0].in_features
    for b in (1, 5, 47, 48, 49, 300):
        x = torch.randn(b, k_in) * torch.logspace(-2, 1, b)[:, None]
        x[0] = 0                                                         # an all-zero row: scale 1, no NaN
        got, ref, fp32 = m(x), ref_int8_mlp(net, x), net(x)
        peak = fp32.abs().max()
        assert_close(got / peak, ref / peak, "vnni-mlp-reference", f"{shape} B={b} vs integer reference")
        assert_close(got / peak, fp32 / peak, "int8-mlp-vs-fp32", f"{shape} B={b} vs fp32")
        q, s = int8_kernels().quantize_rows(x, m.kp)
        assert_close(m.from_quant(q, s), got, "exact", "from_quant vs forward")


def test_pack_layout():
    q = torch.arange(16 * 6, dtype=torch.int8).reshape(16, 6)           # N = 16, Kp = 6
    p = pack(q)
    assert p.shape == (2, 3, 8, 2) and p.dtype == torch.int16
    for nt in range(2):
        for k2 in range(3):
            for c in range(8):
                for j in range(2):
                    assert p[nt, k2, c, j] == q[8 * nt + c, 2 * k2 + j]


@torch.no_grad()
def test_int8_mlp_follows_the_tier_and_refuses_by_name(isa_tier):
    from targets.native.vnni_mlp import VnniMlp, vnni_missing

    net = mlp([13, 512, 256, 64, 16], relu_last=True)
    chosen = type(int8_mlp(net))
    assert int8_mlp_form(net)[0] is chosen
    if vnni_missing() is None:
        assert chosen is VnniMlp
    elif avx2_int8_missing() is None:
        assert chosen is Avx2Int8Mlp
    else:
        assert chosen is Int8Mlp and isa_tier == "generic"
        # torch-fast-int8 refuses exactly here, and only where _int_mm is inexact in this process
        # (a process started with REWRITE_ISA=avx2 caps oneDNN there: tests/rewrite/cli tests a fresh one)
        why = int8_mlp_wrong(net)
        assert why == int8_mlp_wrong() and (why is None) == (int_mm_inexact() is None)
        if why:
            assert why == (f"its int8 MLPs would be one torch._int_mm per layer (VNNI MLP: {vnni_missing()}; "
                           f"AVX2 int8 MLP: {avx2_int8_missing()}), and {int_mm_inexact()}")
        return
    assert int8_mlp_wrong(net) is None and int8_mlp_wrong() is None       # a one-call kernel serves it
    odd = mlp([16, 20, 8], relu_last=True)
    assert shape_missing(odd) == "layer widths [20] are not multiples of 8"
    assert int8_mlp_form(odd)[0] is Int8Mlp                    # no one-call kernel takes a width of 20
    assert (int8_mlp_wrong(odd) is None) == (int_mm_inexact() is None)
    if avx2_int8_missing() is None:
        with pytest.raises(RewriteError, match="AVX2 int8 MLP: layer widths"):
            Avx2Int8Mlp(odd)
        m = Avx2Int8Mlp(mlp([13, 32, 16], relu_last=True))
        with pytest.raises(RuntimeError, match=r"x must be f32 \[B, 13\]"):
            m.mlp.forward(torch.zeros(3, 12))
        with pytest.raises(RuntimeError, match=r"q must be s8 \[B, 16\]"):
            m.from_quant(torch.zeros(3, 8, dtype=torch.int8), torch.ones(3))
