import pytest
import torch

from targets.base import get_target
from tests.representations import composite_model
from tests.targets.checks import assert_matches_eager, lower_and_load

torch.set_num_threads(1)
target = get_target("torch-compile")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(target.unavailable() is not None, reason=str(target.unavailable()))]


def test_aot_inductor_package_matches_eager_for_every_representation(tmp_path):
    model = composite_model()
    compiled, runner = lower_and_load(target, model, tmp_path)
    assert compiled.files == ["model.pt2"]
    assert_matches_eager(runner, model, "fp32")


def test_unavailable_without_a_cxx_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "no C++ compiler (no-such-compiler or c++ on PATH)" in target.unavailable()
