"""torch -> Relax import: what the ops become, parameters as inputs, and unlowerable ops named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rewrite.core.embedding import Representation, TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.model import ModelSpec, RecModel
from passes.quotient_remainder import QRBag
from targets.tvm import relax as tvm_relax


def small_model(tables: dict[str, Representation]) -> RecModel:
    spec = ModelSpec(n_dense=3, bottom=(4,), top=(1,),
                     features=tuple((f"f_{t}", t) for t in tables))
    torch.manual_seed(0)
    for rep in tables.values():
        for p in rep.parameters():
            nn.init.uniform_(p, -1, 1)
    return RecModel(spec, tables).eval()


def imported(model: RecModel):
    ep = tvm_relax.export(model)
    return tvm_relax.to_relax(ep, "tvm-llvm")


def test_qr_division_and_remainder_lower_to_integer_ops():
    """trunc division -> relax.divide (TIR's truncating integer division), never a float
    round trip or floor_divide; remainder -> floor_mod; dlrm's float quotient stays float."""
    exact = small_model({"q": QRBag(3_000_000_000, 4, 100_003, op="add")})
    ops = tvm_relax.relax_ops(imported(exact)[0])
    assert {"relax.divide", "relax.floor_mod"} <= ops
    assert not {"relax.floor_divide", "relax.trunc", "relax.astype"} & ops
    dlrm = small_model({"q": QRBag(1000, 4, 8, pool_first=True, float_quotient=True)})
    assert {"relax.astype", "relax.divide", "relax.floor_mod"} <= tvm_relax.relax_ops(imported(dlrm)[0])


def test_parameters_are_runtime_inputs_with_dynamic_shapes():
    model = small_model({"a": TableBag(50, 4), "b": TableBag(70, 4, dtype="float16")})
    mod, params, names = imported(model)
    main = mod["main"]
    assert int(main.attrs["num_input"]) == 1 + 2 * 2
    assert len(params) == len(names) == len(main.params) - 5
    assert {"p_model_embeddings_a_weight", "p_model_embeddings_b_weight"} <= set(names)
    dense, idx_a, off_a = (str(p.ty) for p in main.params[:3])
    batch = dense.split("(")[1].split(",")[0]
    assert not batch.isdigit() and f"1 + {batch}" in off_a.replace("(", " ").replace('"', " ")
    assert not idx_a.split("(")[1].split(",")[0].isdigit()        # lookup count is symbolic


class EmbeddingBagTable(Representation):
    """A table written with F.embedding_bag, which TVM's importer has no converter for."""

    def __init__(self, rows, dim):
        super().__init__()
        self.rows, self.dim, self.pooling = rows, dim, "sum"
        self.weight = nn.Parameter(torch.empty(rows, dim))

    def forward(self, indices, offsets):
        return nn.functional.embedding_bag(indices, self.weight, offsets[:-1], mode="sum")


def test_unlowerable_op_is_named_with_its_table():
    model = small_model({"ok": TableBag(20, 4), "bagged": EmbeddingBagTable(30, 4)})
    with pytest.raises(RewriteError, match=r"tvm-llvm: TVM cannot lower op _embedding_bag\S* "
                                           r"in table bagged \(no Relax converter"):
        imported(model)
