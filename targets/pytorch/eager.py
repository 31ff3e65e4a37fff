"""torch eager targets: the reference path and bf16 MLPs.

``torch``:      the model as it is (safetensors + spec, the native format), run by eager PyTorch.
``torch-bf16``: the same file; at load the bottom and top MLPs become bf16 copies
    y = bf16(x) W_bf16ᵀ + b_bf16  (oneDNN bf16 GEMM, fp32 accumulation)  -> cast back to fp32,
so tables, pooling and the interaction stay fp32 (onnxruntime's CPU provider has no bf16 GEMM).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rewrite.core.batch import Batch
from rewrite.core.model import RecModel
from targets.base import CompiledPath, Runner, Target, register_target

MODEL_FILE = "model.safetensors"


class Bf16Mlp(nn.Module):
    """An MLP computed in bf16 with fp32 input and output."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = copy.deepcopy(mlp).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.to(torch.bfloat16)).to(torch.float32)


def torch_runner(model: RecModel, threads: int | None) -> Runner:
    if threads:
        torch.set_num_threads(threads)
    model.eval()

    @torch.inference_mode()
    def run(dense: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
        out = model.forward_bags(torch.from_numpy(dense), [torch.from_numpy(b) for b in bags])
        return out.numpy()

    return run


@register_target("torch")
class TorchEager(Target):
    summary = "eager PyTorch on the native model file (the reference path)"

    def lower(self, model: RecModel, example: Batch, out_dir: Path, **options: Any) -> CompiledPath:
        from rewrite.core.model_file import save

        save(model, out_dir / MODEL_FILE)
        return CompiledPath(self.name, [MODEL_FILE])

    def load_model(self, out_dir: Path) -> RecModel:
        from rewrite.core.model_file import load

        return load(out_dir / MODEL_FILE)

    def load(self, out_dir: Path, compiled: CompiledPath, threads: int | None = None) -> Runner:
        return torch_runner(self.load_model(out_dir), threads)


@register_target("torch-bf16")
class TorchBf16(TorchEager):
    summary = "eager PyTorch with the MLPs in bf16 (tables and interaction fp32)"
    precision = "bf16-dense"

    def unavailable(self) -> str | None:
        if not torch.backends.mkldnn.is_available():
            return "this torch build has no oneDNN (mkldnn), so no fast bf16 GEMM on CPU"
        return None

    def load_model(self, out_dir: Path) -> RecModel:
        model = super().load_model(out_dir)
        model.bottom, model.top = Bf16Mlp(model.bottom), Bf16Mlp(model.top)
        return model
