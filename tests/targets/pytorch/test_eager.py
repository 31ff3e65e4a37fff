import pytest
import torch

from targets.base import get_target
from targets.pytorch.eager import Bf16Mlp
from tests.representations import composite_model
from tests.targets.checks import assert_matches_eager, lower_and_load

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return composite_model()


def test_torch_path_is_the_model_itself(model, tmp_path):
    compiled, runner = lower_and_load(get_target("torch"), model, tmp_path)
    assert compiled.files == ["model.safetensors"]
    # same model and kernels; F.embedding_bag's vectorised loop depends on how its inputs are laid
    # out (views of the canonical batch vs contiguous per-feature arrays), so not bit-exact
    assert assert_matches_eager(runner, model, "fp32") <= 1e-6


def test_bf16_path_runs_mlps_in_bf16_and_tables_in_fp32(model, tmp_path):
    target = get_target("torch-bf16")
    assert target.precision == "bf16-dense"
    compiled, runner = lower_and_load(target, model, tmp_path)
    loaded = target.load_model(tmp_path)
    assert isinstance(loaded.bottom, Bf16Mlp) and isinstance(loaded.top, Bf16Mlp)
    assert all(p.dtype == torch.bfloat16 for p in loaded.top.parameters())
    assert {p.dtype for p in loaded.embeddings.parameters()} == {p.dtype for p in model.embeddings.parameters()}
    worst = assert_matches_eager(runner, model, "bf16-dense")
    assert worst > 0      # really computed in bf16
