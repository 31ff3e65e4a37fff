"""The dot interaction in the form the ONNX targets export: one GatherElements of the pairs.

Before (``rewrite.core.model.DotInteraction``, the eager reference):
    T = stack(x, e_0..e_{F-1})              Unsqueeze x 27 + Concat
    z = cat(x, flatten(T Tᵀ)[:, flat_pairs]) MatMul, Reshape, Gather(axis=1), Concat
After (``PairGatherDotInteraction``, then ``int32_pair_indices`` on the exported graph):
    T = reshape(cat(x, e_0..e_{F-1}), [B, n, d])                  Concat, Reshape
    Z = flatten(T Tᵀ)                                              MatMul, Reshape
    z = cat(x, GatherElements(Z, expand(pairs, [B, P]), axis=1))   int32 pairs, Expand, Concat
Both copy the same bmm's entries: equal to the reference bit for bit, at every batch size.
onnxruntime's Gather on axis 1 copies one element at a time with a memcpy (2.1 ms of the
interaction's 4.0 ms at B = 2048 on the Kaggle shape); GatherElements indexes element by element
in a typed loop, and int32 indices halve the index tensor it reads (int64: slower than slicing).
Measured on the Kaggle shape (27 vectors of 16, 351 pairs), one thread, inputs and output bound
with IOBinding, each form in its own process (ms, eager in the same series):
    B = 1:    this 0.012, slices-or-gather If 0.017, eager 0.031
    B = 2048: this 2.22 (int64 indices 2.56), 26 row-run Slices + Concat 2.40, the If of both
              2.43, Gather of the transposed [n*n, B] Gram + Transposes 3.2-3.5, eager 2.01
(ORT profile at 2048: input Concat ~0.5, MatMul 0.8, GatherElements 0.53 + Expand 0.14, output
Concat ~0.3: the two concats and the pair copy are each a pass over 3 MB in small pieces.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rewrite.core.model import DotInteraction, RecModel

INT32_MAX = 2**31 - 1


class PairGatherDotInteraction(nn.Module):
    """``DotInteraction`` with the pair selection written as ``torch.gather`` (GatherElements)."""

    def __init__(self, n_vectors: int, flat_pairs: torch.Tensor):
        super().__init__()
        self.n_vectors = n_vectors
        self.register_buffer("flat_pairs", flat_pairs.reshape(1, -1), persistent=False)

    def forward(self, x: torch.Tensor, embeddings: list[torch.Tensor]) -> torch.Tensor:
        t = torch.cat([x, *embeddings], dim=1).reshape(-1, self.n_vectors, x.shape[1])
        z = torch.bmm(t, t.transpose(1, 2)).flatten(1)
        pairs = torch.gather(z, 1, self.flat_pairs.expand(x.shape[0], -1))
        return torch.cat([x, pairs], dim=1)


def onnx_form(model: RecModel) -> RecModel:
    """``model`` with its dot interaction (if any) in the pair-gather form; everything else shared."""
    if not isinstance(model.interaction, DotInteraction):
        return model
    form = model.with_tables({})
    form.interaction = PairGatherDotInteraction(len(model.spec.features) + 1, model.interaction.flat_pairs)
    return form


def int32_pair_indices(ir_model) -> int:
    """In an exported graph, make every GatherElements whose indices are an Expand of an int64
    constant read int32 indices instead (the same values; onnxruntime accepts both); returns how
    many were rewritten.  Constants with a value beyond int32 are left alone."""
    import onnx_ir as ir

    graph, done = ir_model.graph, 0
    for node in list(graph):
        if node.op_type != "GatherElements" or node.inputs[1].producer() is None:
            continue
        expand = node.inputs[1].producer()
        const = expand.inputs[0] if expand.op_type == "Expand" else None
        if const is None or const.const_value is None or const.dtype != ir.DataType.INT64:
            continue
        values = const.const_value.numpy()
        if values.size and (values.min() < 0 or values.max() > INT32_MAX):
            continue
        name = f"{const.name}_int32"
        small = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(values.shape),
                         const_value=ir.tensor(values.astype(np.int32), name=name))
        graph.register_initializer(small)
        narrow = ir.node("Expand", [small, expand.inputs[1]], name=f"{expand.name}_int32")
        narrow.outputs[0].name = f"{expand.outputs[0].name}_int32"
        narrow.outputs[0].dtype, narrow.outputs[0].shape = ir.DataType.INT32, expand.outputs[0].shape
        graph.insert_before(node, [narrow])
        node.replace_input_with(1, narrow.outputs[0])
        if not expand.outputs[0].uses():
            graph.remove(expand, safe=True)
        if not const.uses() and not const.is_graph_output():
            graph.initializers.pop(const.name)
        done += 1
    return done
