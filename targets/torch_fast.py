"""``torch-fast``: eager PyTorch with the three measured levers of issue 10 applied at load.

Before (the ``torch`` path): 26 ``embedding_bag`` calls (one per feature), fp32 MLPs (MKL,
~100 GFLOP/s per core on this AMD CPU), ``DotInteraction`` over a list of [B, d] tensors.
After, same weights, same math:
* fused lookup: every plain table concatenated into one W [Σ rows, d]; feature f's ids are
  shifted by its table's first row, so ONE ``embedding_bag`` over the canonical batch
  (offsets [F*B + 1] unchanged) pools all F*B bags:  e[f, b] = Σ_{i in bag(f,b)} W[base_f + i];
* MLPs in bf16 (oneDNN, fp32 accumulation) from ``BF16_MIN_BATCH`` samples up; below it the fp32
  MLPs, which are faster at tiny batches (B=1: 0.034 ms fp32 vs 0.082 ms bf16 bottom MLP here);
* interaction from the fused output without a Python list: T = [x; e_0..e_{F-1}] as one
  [B, F+1, d] tensor, Z = T Tᵀ (bmm), the kept pairs by one index_select.
The runner also takes the canonical batch directly (``canonical``), skipping the per-feature split.
Only plain tables of one dim and one pooling mode are fused; anything else is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rewrite.batch import Batch
from rewrite.embedding import TableBag
from rewrite.errors import RewriteError
from rewrite.model import RecModel
from targets.base import CompiledPath, register_target
from targets.torch_eager import Bf16Mlp, TorchEager

BF16_MIN_BATCH = 64      # samples; bf16 GEMMs win from here (bench: rewrite bench, kaggle model)
SMALL_MAX_BATCH = 4      # samples; up to here torch-fast-int8 runs each MLP as one C++ call


def fusable(model: RecModel) -> None:
    """RewriteError unless every table is a plain fp32 ``TableBag`` of one dim and pooling."""
    dims, poolings = set(), set()
    for name, rep in model.embeddings.items():
        if type(rep) is not TableBag or rep.weight.dtype != torch.float32:
            raise RewriteError(f"torch-fast cannot fuse table {name!r}: it is a {rep.describe()!r}; "
                               f"this target fuses only plain fp32 tables")
        dims.add(rep.dim)
        poolings.add(rep.pooling)
    if len(dims) != 1 or len(poolings) != 1:
        raise RewriteError(f"torch-fast fuses tables of one dim and one pooling mode, found dims "
                           f"{sorted(dims)} and poolings {sorted(poolings)}")


class FusedTables(nn.Module):
    """All features' bags through one ``embedding_bag``: canonical (indices, offsets) -> [F, B, d]."""

    def __init__(self, model: RecModel):
        super().__init__()
        fusable(model)
        names = list(model.embeddings)
        starts = np.cumsum([0] + [model.embeddings[t].rows for t in names])
        self.weight = nn.Parameter(torch.cat([model.embeddings[t].weight.detach() for t in names]),
                                   requires_grad=False)
        base = [int(starts[names.index(t)]) for t in model.feature_tables]
        self.register_buffer("base", torch.tensor(base, dtype=torch.int64), persistent=False)
        rows = [model.embeddings[t].rows for t in model.feature_tables]
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.int64), persistent=False)
        self.native_max_batch = 0      # batches up to this size use the C++ kernel (fused_bags)
        self.pooling = model.embeddings[names[0]].pooling
        self.dim = model.embeddings[names[0]].dim

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        n_features = self.base.numel()
        batch = (offsets.numel() - 1) // n_features
        if batch <= self.native_max_batch:
            from targets.int8_kernels import kernels

            return kernels().fused_bags(self.weight, indices, offsets, self.base, self.rows,
                                        self.pooling == "mean")
        counts = offsets[::batch].diff()                     # lookups per feature [F]
        shifted = indices + torch.repeat_interleave(self.base, counts, output_size=indices.numel())
        pooled = nn.functional.embedding_bag(shifted, self.weight, offsets, mode=self.pooling,
                                             include_last_offset=True)
        return pooled.view(n_features, batch, self.dim)


class FastDLRM(nn.Module):
    """bottom MLP -> fused lookup -> stacked dot interaction -> top MLP (bf16 MLPs at large B)."""

    def __init__(self, model: RecModel):
        super().__init__()
        if model.spec.interaction != "dot":
            raise RewriteError(f"torch-fast supports the dot interaction, not {model.spec.interaction!r}")
        self.tables = FusedTables(model)
        self.bottom, self.top = model.bottom, model.top
        self.bottom16, self.top16 = Bf16Mlp(model.bottom), Bf16Mlp(model.top)
        self.register_buffer("pairs", model.interaction.flat_pairs, persistent=False)

    def mlp(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """``which`` ("bottom" or "top") MLP of x: bf16 from BF16_MIN_BATCH rows up, else fp32."""
        big = x.shape[0] >= BF16_MIN_BATCH
        return getattr(self, which + "16" if big else which)(x)

    def interact(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """[x, <t_i, t_j> kept pairs] from x [B, d] and the fused lookup e [F, B, d]."""
        t = torch.cat([x.unsqueeze(0), e], 0).transpose(0, 1)          # [B, F+1, d]
        z = torch.bmm(t, t.transpose(1, 2)).flatten(1).index_select(1, self.pairs)
        return torch.cat([x, z], 1)

    def forward(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        x = self.mlp("bottom", dense)
        return self.mlp("top", self.interact(x, self.tables(indices, offsets))).squeeze(1)


class FastRunner:
    """The runner contract ``(dense, bags) -> logits`` plus ``canonical(dense, indices, offsets)``."""

    def __init__(self, net: FastDLRM):
        self.net = net

    @torch.inference_mode()
    def canonical(self, dense: np.ndarray, indices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return self.net(torch.from_numpy(dense), torch.from_numpy(indices), torch.from_numpy(offsets)).numpy()

    def __call__(self, dense: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
        idx, offs = bags[0::2], bags[1::2]
        base = np.cumsum([0] + [len(i) for i in idx])
        offsets = np.concatenate([o[:-1] + b for o, b in zip(offs, base)] + [base[-1:]])
        return self.canonical(dense, np.concatenate(idx).astype(np.int64), offsets.astype(np.int64))


@register_target("torch-fast")
class TorchFast(TorchEager):
    summary = "eager PyTorch, one fused lookup for all tables, bf16 MLPs from batch 64"
    precision = "bf16-dense"

    def unavailable(self) -> str | None:
        if not torch.backends.mkldnn.is_available():
            return "this torch build has no oneDNN (mkldnn), so no fast bf16 GEMM on CPU"
        return None

    def lower(self, model: RecModel, example: Batch, out_dir: Path, **options: Any) -> CompiledPath:
        fusable(model)
        return super().lower(model, example, out_dir, **options)

    def load(self, out_dir: Path, compiled: CompiledPath, threads: int | None = None) -> FastRunner:
        if threads:
            torch.set_num_threads(threads)
        model = self.load_model(out_dir)
        net = FastDLRM(model).eval()
        model.embeddings = nn.ModuleDict()                 # drop the unfused copies of the tables
        return FastRunner(net)


class FastInt8DLRM(FastDLRM):
    """``FastDLRM`` with int8 MLPs (``targets.int8_kernels``) from BF16_MIN_BATCH samples up, the
    dot interaction in C++ (fused with the top MLP's input quantization at int8 batch sizes), and
    up to SMALL_MAX_BATCH samples the lookup and each MLP as single C++ calls.  From there on the
    lookup stays ``embedding_bag`` (fbgemm's JIT kernel: 0.55 ms vs 0.9 ms for ours at B=2048)."""

    def __init__(self, model: RecModel):
        from targets.int8_kernels import Int8Mlp, SmallMlp

        super().__init__(model)
        self.tables.native_max_batch = SMALL_MAX_BATCH
        self.bottom16, self.top16 = Int8Mlp(model.bottom), Int8Mlp(model.top)
        self.bottom_small, self.top_small = SmallMlp(model.bottom), SmallMlp(model.top)
        n = len(model.spec.features) + 1
        pi, pj = torch.div(self.pairs, n, rounding_mode="trunc"), self.pairs % n
        self.register_buffer("pair_i", pi.to(torch.int32), persistent=False)
        self.register_buffer("pair_j", pj.to(torch.int32), persistent=False)

    def mlp(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """One C++ call up to SMALL_MAX_BATCH rows, fp32 eager below BF16_MIN_BATCH, else int8."""
        if x.shape[0] <= SMALL_MAX_BATCH:
            return getattr(self, which + "_small")(x)
        return super().mlp(which, x)

    def interact(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        from targets.int8_kernels import kernels

        return kernels().dot_interaction(x, e, self.pair_i, self.pair_j)

    def forward(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        from targets.int8_kernels import kernels

        if dense.shape[0] < BF16_MIN_BATCH:
            return super().forward(dense, indices, offsets)     # mlp/interact below pick the small forms
        x = self.bottom16(dense)
        q, s = kernels().dot_interaction_quant(x, self.tables(indices, offsets), self.pair_i, self.pair_j,
                                               self.top16.kp)
        return self.top16.from_quant(q, s).squeeze(1)


@register_target("torch-fast-int8")
class TorchFastInt8(TorchFast):
    summary = "torch-fast with int8 MLPs (_int_mm + fused C++ kernels) and a fused C++ interaction"
    precision = "int8-dense"

    def unavailable(self) -> str | None:
        from targets.int8_kernels import compiler_missing

        return compiler_missing() or super().unavailable()

    def load(self, out_dir: Path, compiled: CompiledPath, threads: int | None = None) -> FastRunner:
        if threads:
            torch.set_num_threads(threads)
        model = self.load_model(out_dir)
        net = FastInt8DLRM(model).eval()
        model.embeddings = nn.ModuleDict()
        return FastRunner(net)
