"""The ONNX export form of the dot interaction: bit-equal to eager, no element-wise Gather."""

from __future__ import annotations

import onnx
import pytest
import torch

from benchmarks.kaggle_model import kaggle_model
from rewrite.embedding import TableBag
from rewrite.model import ModelSpec, RecModel
from targets.base import get_target
from targets.onnx_interaction import RowRunsDotInteraction, onnx_form
from tests.targets import checks
from tests.targets.checks import assert_matches_eager, lower_and_load

torch.set_num_threads(1)


def small(order: str = "dlrm", interaction: str = "dot") -> RecModel:
    torch.manual_seed(0)
    tables = {f"t{i}": TableBag(40 + i, 8) for i in range(4)}
    for t in tables.values():
        torch.nn.init.uniform_(t.weight, -1, 1)
    spec = ModelSpec(n_dense=3, bottom=(16, 8), top=(8, 1), pairs=order, interaction=interaction,
                     features=tuple((f"f{i}", f"t{i}") for i in range(4)))
    return RecModel(spec, tables).eval()


@pytest.mark.parametrize("order", ["dlrm", "dlrm-self", "torchrec"])
def test_row_runs_form_is_bit_equal_to_eager(order):
    model = small(order)
    form = onnx_form(model)
    assert isinstance(form.interaction, RowRunsDotInteraction) and form.bottom is model.bottom
    with torch.no_grad():
        for b in checks.test_batches(model):
            assert torch.equal(form(*b.inputs()), model(*b.inputs()))


def test_other_interactions_are_left_alone():
    model = small(interaction="cat")
    assert onnx_form(model) is model


def test_exported_interaction_has_no_axis1_gather_and_matches_eager(tmp_path):
    model = kaggle_model((50, 7, 300) + (20,) * 23)
    compiled, runner = lower_and_load(get_target("onnx-cpu"), model, tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}

    def from_matmul(name: str, depth: int = 3) -> bool:
        node = producer.get(name)
        return node is not None and depth > 0 and (
            node.op_type in ("MatMul", "FusedMatMul") or any(from_matmul(i, depth - 1) for i in node.input))

    gathers = [n for n in graph.node if n.op_type == "Gather" and from_matmul(n.input[0])]
    slices = [n for n in graph.node if n.op_type == "Slice" and from_matmul(n.input[0])]
    assert not gathers and len(slices) == 26
    assert assert_matches_eager(runner, model, "fp32") < 2e-5
