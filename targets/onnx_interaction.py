"""The dot interaction in the form the ONNX targets export: row slices for large batches.

Before (``rewrite.model.DotInteraction``, the eager reference):
    T = stack(x, e_0..e_{F-1})              Unsqueeze x 27 + Concat
    z = cat(x, flatten(T Tᵀ)[:, flat_pairs]) MatMul, Reshape, Gather(axis=1), Concat
After (``RowRunsDotInteraction``):
    T = reshape(cat(x, e_0..e_{F-1}), [B, n, d])                  Concat, Reshape
    Z = flatten(T Tᵀ)                                              MatMul, Reshape
    B > SMALL_BATCH: z = cat(x, Z[:, i*n + lo : i*n + hi] for each run (i, lo, hi))
                                                                   one Slice per run, Concat
    else:            z = cat(x, Z[:, flat_pairs])                 Gather, Concat
    (one ONNX If on the batch size, from ``torch.cond``)
The kept pairs of every order are runs of consecutive columns of one row of T Tᵀ
(``targets.tvm_interaction.pair_runs``), so both branches copy the same bmm's entries: equal to
the reference bit for bit.  onnxruntime copies a Gather along axis 1 one element at a time
(2.1 ms of the interaction's 4.0 ms at B = 2048 on the Kaggle shape; the 26 slices take 0.76 ms),
while at small batches the 26 extra nodes cost more than the gather.  Measured on the Kaggle
shape, one thread, inputs bound with IOBinding, same run (ms): B = 1 gather 0.018, slices 0.043,
this 0.022, eager 0.024; B = 2048 gather 3.44, slices 2.08, this 2.19, eager 1.69.
"""

from __future__ import annotations

import torch
from torch import nn

from rewrite.model import DotInteraction, RecModel
from targets.tvm_interaction import pair_runs


SMALL_BATCH = 16          # samples; the gather and the slices cross between 8 and 64 here


class RowRunsDotInteraction(nn.Module):
    def __init__(self, n_vectors: int, runs: list[tuple[int, int, int]], flat_pairs: torch.Tensor):
        super().__init__()
        self.n_vectors, self.runs = n_vectors, runs
        self.register_buffer("flat_pairs", flat_pairs, persistent=False)

    def forward(self, x: torch.Tensor, embeddings: list[torch.Tensor]) -> torch.Tensor:
        t = torch.cat([x, *embeddings], dim=1).reshape(-1, self.n_vectors, x.shape[1])
        return torch.cond(x.shape[0] <= SMALL_BATCH, self.gathered, self.sliced, (x, t))

    def gathered(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = torch.bmm(t, t.transpose(1, 2)).flatten(1)
        return torch.cat([x, z.index_select(1, self.flat_pairs)], dim=1)

    def sliced(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
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
    form.interaction = RowRunsDotInteraction(n, runs, model.interaction.flat_pairs)
    return form
