"""The target contract: how a runnable backend lowers a model and runs it.

    lower(model, example, out_dir, **options) -> CompiledPath     (compiler side)
    load(out_dir, compiled) -> Runner                              (runtime side)
    runner(dense [B, n_dense] f32, bags [idx_0, off_0, ...]) -> logits [B] f32 (numpy)

Targets see the model only through ``ExportedBags``: ``forward(dense, idx_0, off_0, ...)``,
one (indices, offsets-from-0) pair per feature, so every exporter gets flat tensor inputs and
no data-dependent slicing; the runtime splits canonical batches in numpy (``split_bags_np``).
Targets never branch on representations: a representation that uses an op a target cannot
lower is reported by the target with the op and the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from rewrite.batch import Batch
from rewrite.errors import RewriteError
from rewrite.model import RecModel

Runner = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]
TARGETS: dict[str, type["Target"]] = {}


@dataclass
class CompiledPath:
    """What a target wrote into its folder of a bundle."""

    target: str
    files: list[str]                                   # relative to the path's folder
    options: dict[str, Any] = field(default_factory=dict)


class Target:
    name: ClassVar[str]
    devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def unavailable(self) -> str | None:
        """None when this target can run here, else why not (a missing package or device)."""
        return None

    def lower(self, model: RecModel, example: Batch, out_dir: Path, **options: Any) -> CompiledPath:
        raise NotImplementedError

    def load(self, out_dir: Path, compiled: CompiledPath) -> Runner:
        raise NotImplementedError


def register_target(name: str):
    def wrap(cls):
        if name in TARGETS:
            raise ValueError(f"target {name!r} registered twice")
        cls.name = name
        TARGETS[name] = cls
        return cls

    return wrap


def get_target(name: str) -> Target:
    import targets  # noqa: F401  (registers the targets it lists)

    if name not in TARGETS:
        raise RewriteError(f"unknown target {name!r} (known: {', '.join(sorted(TARGETS))})")
    return TARGETS[name]()


class ExportedBags(torch.nn.Module):
    """``forward(dense, idx_0, off_0, ..., idx_{F-1}, off_{F-1}) -> logits``: the exported form."""

    def __init__(self, model: RecModel):
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, *bags: torch.Tensor) -> torch.Tensor:
        return self.model.forward_bags(dense, list(bags))


def split_bags_np(indices: np.ndarray, offsets: np.ndarray, n_features: int) -> list[np.ndarray]:
    """Canonical feature-major bags -> [idx_0, off_0, ...] with each off_f starting at 0 (int64)."""
    batch = (len(offsets) - 1) // n_features
    bounds = offsets[::batch]
    out: list[np.ndarray] = []
    for f in range(n_features):
        lo, hi = int(bounds[f]), int(bounds[f + 1])
        out.append(np.ascontiguousarray(indices[lo:hi], dtype=np.int64))
        out.append(np.ascontiguousarray(offsets[f * batch:(f + 1) * batch + 1] - lo, dtype=np.int64))
    return out


def bag_input_names(n_features: int) -> list[str]:
    return ["dense"] + [n for f in range(n_features) for n in (f"indices_{f}", f"offsets_{f}")]
