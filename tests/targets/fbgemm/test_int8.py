import pytest
import torch

from rewrite.core.errors import RewriteError
from targets.base import get_target
from targets.fbgemm.int8 import quantize_rows
from tests.representations import REPRESENTATIONS, composite_model
from tests.targets.checks import assert_matches_eager, lower_and_load

torch.set_num_threads(1)
target = get_target("fbgemm-int8")
needs_fbgemm = pytest.mark.skipif(target.unavailable() is not None, reason=str(target.unavailable()))
TABLES = [r for r in REPRESENTATIONS if r[0] in ("table-fp32", "table-fp16", "table-bf16")]


def test_row_quantization_error_is_half_a_step():
    w = torch.randn(50, 16)
    codes, scale_bias = quantize_rows(w)
    assert codes.dtype == torch.uint8 and scale_bias.dtype == torch.float16
    sb = scale_bias.float()
    back = codes.float() * sb[:, :1] + sb[:, 1:]
    step = sb[:, :1]
    assert bool(((back - w).abs() <= step * 0.5 + 2e-3 * w.abs().amax(1, keepdim=True)).all())


@needs_fbgemm
def test_int8_tbe_matches_eager_on_plain_tables(tmp_path):
    model = composite_model(TABLES)
    compiled, runner = lower_and_load(target, model, tmp_path)
    assert compiled.files == ["tables.safetensors"]
    assert compiled.options["embedding_bytes"] == sum(r.rows * (r.dim + 4) for r in model.embeddings.values())
    assert 0 < assert_matches_eager(runner, model, "int8-tables")


@needs_fbgemm
def test_other_representations_are_refused_by_table_name(tmp_path):
    with pytest.raises(RewriteError, match=r"fbgemm-int8 cannot lower table 't4_qr-mult': it is a 'qr'"):
        lower_and_load(target, composite_model(), tmp_path)
