"""``fbgemm-int8``: FBGEMM's inference table-batched embedding bag with int8 rows (TorchRec's
serving format), MLPs and interaction in eager PyTorch fp32.

Before: plain tables W_t [rows, d] (``TableBag``).  After, per row r of each table:
    scale_r = (max_r - min_r) / 255,  bias_r = min_r,  q_r = round((W_r - bias_r) / scale_r) in uint8
stored as ``tables.safetensors`` (codes [rows, d] uint8, scale/bias [rows, 2] fp16, FBGEMM's
layout) and one fused kernel pools every feature:  e(bag) = Σ_i scale_i q_i + bias_i.
Needs ``fbgemm-gpu-cpu`` (1.8.0 loads with torch 2.13); other representations are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rewrite.core.batch import Batch
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.model import RecModel
from targets.base import CompiledPath, Runner, Target, register_target

TABLES_FILE = "tables.safetensors"
SPEC_KEY = "dlrm_rewrite.spec"


def _fbgemm():
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen)

    return SparseType, EmbeddingLocation, PoolingMode, IntNBitTableBatchedEmbeddingBagsCodegen


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise asymmetric uint8: codes [rows, d] and fp16 (scale, bias) [rows, 2]."""
    w = weight.to(torch.float32)
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    scale_bias = torch.cat([(hi - lo) / 255.0, lo], 1).to(torch.float16)
    scale = scale_bias[:, :1].to(torch.float32).clamp(min=torch.finfo(torch.float16).tiny)
    codes = torch.round((w - scale_bias[:, 1:].to(torch.float32)) / scale).clamp(0, 255)
    return codes.to(torch.uint8), scale_bias


class FbgemmDLRM(nn.Module):
    """bottom MLP -> one TBE call for every feature -> interaction -> top MLP."""

    def __init__(self, model: RecModel, tables: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        sparse_type, location, pooling_mode, tbe_class = _fbgemm()
        names = list(tables)
        poolings = {model.embeddings[t].pooling for t in names}
        if len(poolings) != 1:
            raise RewriteError(f"fbgemm-int8: one pooling mode per model, found {sorted(poolings)}")
        mode = pooling_mode.SUM if poolings == {"sum"} else pooling_mode.MEAN
        self.tbe = tbe_class(
            [(t, tables[t][0].shape[0], tables[t][0].shape[1], sparse_type.INT8, location.HOST)
             for t in names],
            feature_table_map=[names.index(t) for t in model.feature_tables], device="cpu",
            pooling_mode=mode, output_dtype=sparse_type.FP32)
        self.tbe.initialize_weights()
        for (codes, scale_bias), (w, sb) in zip(tables.values(), self.tbe.split_embedding_weights(
                split_scale_shifts=True)):
            w.copy_(codes)
            sb.copy_(scale_bias.view(torch.uint8))
        self.bottom, self.top, self.interaction = model.bottom, model.top, model.interaction
        self.dims = [model.embeddings[t].dim for t in model.feature_tables]

    def forward(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor):
        pooled = self.tbe(indices, offsets)
        embs = list(torch.split(pooled, self.dims, dim=1))
        return self.top(self.interaction(self.bottom(dense), embs)).squeeze(1)


@register_target("fbgemm-int8")
class FbgemmInt8(Target):
    summary = "FBGEMM int8 row-wise table-batched embedding bag + eager fp32 MLPs"
    precision = "int8-tables"

    def unavailable(self) -> str | None:
        try:
            _fbgemm()
        except (ImportError, OSError) as e:
            return f"fbgemm_gpu does not load ({str(e).splitlines()[0][:120]}); pip install fbgemm-gpu-cpu==1.8.0"
        return None

    def lower(self, model: RecModel, example: Batch, out_dir: Path, **options: Any) -> CompiledPath:
        import safetensors.torch

        tensors = {}
        for name, rep in model.embeddings.items():
            if type(rep) is not TableBag:
                raise RewriteError(f"fbgemm-int8 cannot lower table {name!r}: it is a {rep.kind!r} "
                                   f"representation; this target lowers only plain tables "
                                   f"(embedding-bag over one weight matrix)")
            if rep.dim % 4:
                raise RewriteError(f"fbgemm-int8 cannot lower table {name!r}: dim {rep.dim} is not "
                                   f"a multiple of 4 (FBGEMM's int8 row alignment)")
            codes, scale_bias = quantize_rows(rep.weight.detach())
            tensors[f"{name}.codes"], tensors[f"{name}.scale_bias"] = codes, scale_bias
        for key, value in {**model.bottom.state_dict(prefix="mlp.bottom."),
                           **model.top.state_dict(prefix="mlp.top.")}.items():
            tensors[key] = value.detach().contiguous()
        meta = {SPEC_KEY: json.dumps(model.full_spec(), sort_keys=True)}
        safetensors.torch.save_file(tensors, str(out_dir / TABLES_FILE), metadata=meta)
        table_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                          if k.endswith((".codes", ".scale_bias")))
        return CompiledPath(self.name, [TABLES_FILE], {"rows": "int8 row-wise, fp16 scale/bias",
                                                       "embedding_bytes": table_bytes})

    def load(self, out_dir: Path, compiled: CompiledPath, threads: int | None = None) -> Runner:
        import safetensors

        from rewrite.core.model import model_from_spec

        if threads:
            torch.set_num_threads(threads)
        with safetensors.safe_open(str(out_dir / TABLES_FILE), framework="pt") as f:
            spec = json.loads(f.metadata()[SPEC_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        model = model_from_spec(spec)   # tables stay unallocated-empty; only MLPs are filled
        for name in ("bottom", "top"):
            prefix = f"mlp.{name}."
            getattr(model, name).load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()
                                                  if k.startswith(prefix)})
        tables = {t: (tensors[f"{t}.codes"], tensors[f"{t}.scale_bias"]) for t in model.embeddings}
        net = FbgemmDLRM(model, tables).eval()
        del model

        @torch.inference_mode()
        def run(dense: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
            idx, offs = bags[0::2], bags[1::2]
            base = np.cumsum([0] + [len(i) for i in idx])
            offsets = np.concatenate([o[:-1] + b for o, b in zip(offs, base)] + [base[-1:]])
            out = net(torch.from_numpy(dense), torch.from_numpy(np.concatenate(idx)),
                      torch.from_numpy(offsets))
            return out.numpy()

        return run
