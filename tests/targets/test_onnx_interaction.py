"""The ONNX export form of the dot interaction: bit-equal to eager at every batch size (both
branches), and the large-batch branch has no element-wise Gather."""

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


def test_exported_interaction_branches_on_batch_and_matches_eager(tmp_path):
    """One If: the small-batch branch gathers, the large-batch one slices 26 runs and gathers
    nothing; batches of 1, 2, 6 (small) and 1024, 1536 (large) all match eager."""
    model = kaggle_model((50, 7, 300) + (20,) * 23)
    compiled, runner = lower_and_load(get_target("onnx-cpu"), model, tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    (branch,) = [n for n in graph.node if n.op_type == "If" and "segment_sum" not in n.output[0]]
    sub = {a.name: a.g for a in branch.attribute}
    ops = {name: [n.op_type for n in g.node] for name, g in sub.items()}
    assert ops["then_branch"].count("Gather") == 1 and "Slice" not in ops["then_branch"]
    assert ops["else_branch"].count("Slice") == 26 and "Gather" not in ops["else_branch"]
    assert assert_matches_eager(runner, model, "fp32") < 2e-5


def test_int8_quantization_of_the_kaggle_shape_with_both_ifs(tmp_path):
    """The bag ops' and the interaction's Ifs in one graph: the MLP MatMuls the quantizer adds
    must not reuse an exporter value name (they did: val_374, typed int64 by a bag op)."""
    model = kaggle_model((50, 7, 300) + (20,) * 23)
    compiled, runner = lower_and_load(get_target("onnx-cpu-int8"), model, tmp_path)
    assert compiled.options["quantized_matmuls"] == 7          # every Linear: 4 bottom + 3 top
    assert assert_matches_eager(runner, model, "int8-dense") > 0
