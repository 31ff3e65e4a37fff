"""The dot interaction in the form the ONNX targets export: row slices instead of a gather.

Before (``rewrite.model.DotInteraction``, the eager reference):
    T = stack(x, e_0..e_{F-1})              Unsqueeze x 27 + Concat
    z = cat(x, flatten(T Tᵀ)[:, flat_pairs]) MatMul, Reshape, Gather(axis=1), Concat
After (``RowRunsDotInteraction``):
    T = reshape(cat(x, e_0..e_{F-1}), [B, n, d])                  Concat, Reshape
    Z = flatten(T Tᵀ)                                              MatMul, Reshape
    z = cat(x, Z[:, i*n + lo : i*n + hi] for each run (i, lo, hi)) one Slice per run, Concat
The kept pairs of every order are runs of consecutive columns of one row of T Tᵀ
(``targets.tvm_interaction.pair_runs``), so the same bmm's entries are copied out run by run:
equal to the reference bit for bit.  onnxruntime copies a Gather along axis 1 one element at a
time (2.1 ms of the interaction's 4.0 ms at B = 2048 on the Kaggle shape); the 26 slices take
0.76 ms.  Measured on the Kaggle shape, one thread, 27 inputs, same run: B = 2048 2.37 ms
(the gather form 3.94, eager 2.07); B = 1 0.050 ms (gather form 0.045, eager 0.040): 26 more
small ops.
"""

from __future__ import annotations

import torch
from torch import nn

from rewrite.model import DotInteraction, RecModel
from targets.tvm_interaction import pair_runs


class RowRunsDotInteraction(nn.Module):
    def __init__(self, n_vectors: int, runs: list[tuple[int, int, int]]):
        super().__init__()
        self.n_vectors, self.runs = n_vectors, runs

    def forward(self, x: torch.Tensor, embeddings: list[torch.Tensor]) -> torch.Tensor:
        t = torch.cat([x, *embeddings], dim=1).reshape(-1, self.n_vectors, x.shape[1])
        z = torch.bmm(t, t.transpose(1, 2)).flatten(1)
        n = self.n_vectors
        return torch.cat([x, *(z[:, i * n + lo:i * n + hi] for i, lo, hi in self.runs)], dim=1)


def onnx_form(model: RecModel) -> RecModel:
    """``model`` with its dot interaction (if any) in the row-runs form; everything else shared."""
    if not isinstance(model.interaction, DotInteraction):
        return model
    n = len(model.spec.features) + 1
    runs = pair_runs(model.interaction.flat_pairs.numpy(), n)
    if runs is None:
        return model
    form = model.with_tables({})
    form.interaction = RowRunsDotInteraction(n, runs)
    return form
