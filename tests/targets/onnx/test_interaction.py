"""The ONNX export form of the dot interaction: bit-equal to eager at every batch size, one
GatherElements with int32 indices and no element-wise Gather in the exported graph."""

from __future__ import annotations

import onnx
import pytest
import torch

from benchmarks.kaggle_model import kaggle_model
from rewrite.core.embedding import TableBag
from rewrite.core.model import ModelSpec, RecModel
from targets.base import get_target
from targets.onnx.interaction import PairGatherDotInteraction, onnx_form
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
def test_pair_gather_form_is_bit_equal_to_eager(order):
    model = small(order)
    form = onnx_form(model)
    assert isinstance(form.interaction, PairGatherDotInteraction) and form.bottom is model.bottom
    with torch.no_grad():
        for b in checks.test_batches(model):
            assert torch.equal(form(*b.inputs()), model(*b.inputs()))


def test_other_interactions_are_left_alone():
    model = small(interaction="cat")
    assert onnx_form(model) is model


@pytest.mark.parametrize("target", ["onnx-cpu", "onnx-cpu-int8"])
def test_exported_interaction_is_one_int32_gather_elements_and_matches_eager(tmp_path, target):
    """No If and no Gather outside the bag ops: one GatherElements reading int32 indices (an
    Expand of an int32 initializer, the int64 one gone); batches of 1, 2, 6, 1024 and 1536 match
    eager, the interaction bit for bit (test_pair_gather_form_is_bit_equal_to_eager)."""
    model = kaggle_model((50, 7, 300) + (20,) * 23)
    compiled, runner = lower_and_load(get_target(target), model, tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GatherElements") == 1 and "Gather" not in ops
    assert ops.count("If") == 26                                  # the bag ops' only
    (gather,) = [n for n in graph.node if n.op_type == "GatherElements"]
    (expand,) = [n for n in graph.node if n.output[0] == gather.input[1]]
    init = {i.name: i for i in graph.initializer}
    assert expand.op_type == "Expand" and init[expand.input[0]].data_type == onnx.TensorProto.INT32
    assert "model.interaction.flat_pairs" not in init
    assert_matches_eager(runner, model, "fp32" if target == "onnx-cpu" else "int8-dense")


def test_int8_quantization_of_the_kaggle_shape(tmp_path):
    """The bag ops' Ifs and the interaction in one graph: the MLP MatMuls the quantizer adds
    must not reuse an exporter value name (they did: val_374, typed int64 by a bag op)."""
    model = kaggle_model((50, 7, 300) + (20,) * 23)
    compiled, runner = lower_and_load(get_target("onnx-cpu-int8"), model, tmp_path)
    assert compiled.options["quantized_matmuls"] == 7          # every Linear: 4 bottom + 3 top
    assert assert_matches_eager(runner, model, "int8-dense") > 0
