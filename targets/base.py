"""The target contract: how a runnable backend lowers a model and runs it.

    lower(model, example, out_dir, **options) -> CompiledPath     (compiler side)
    load(out_dir, compiled, threads) -> Runner                     (runtime side)
    runner(dense [B, n_dense] f32, bags [idx_0, off_0, ...]) -> logits [B] f32 (numpy)

Targets see the model only through ``ExportedBags``: ``forward(dense, idx_0, off_0, ...)``,
one (indices, offsets-from-0) pair per feature, so every exporter gets flat tensor inputs and
no data-dependent slicing; the runtime splits canonical batches in numpy (``split_bags_np``).
Targets never branch on representations: a representation that uses an op a target cannot
lower is reported by the target with the op and the table.

Modules implementing targets import their compiler-side libraries (onnx, torch.export,
quantization tools) inside ``lower`` so that the runtime imports only what ``load`` needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from rewrite.core.batch import Batch, split_bags_np
from rewrite.core.errors import RewriteError
from rewrite.core.registry import Registry
from rewrite.core.model import RecModel

Runner = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]
TARGETS: Registry[type["Target"]] = Registry("target", "targets")

# Accepted max |p_path - p_reference| (probabilities) per arithmetic precision of a path, against
# torch eager fp32 of the same model, on the verification batches (rewrite.verification).
# fp32: kernels differ only in summation order (worst 6e-8 on the demo model).  Lossy paths, worst
# on the demo model (`rewrite compile /tmp/demo_targets/model.pt` with every target, then
# `rewrite verify ... --data day_1.npz`): bf16 MLPs 3.5e-3, fbgemm int8 rows 2.5e-3, int8 MLPs
# 5.6e-2 (per-tensor uint8 activations of the first top layer, whose input is the dot
# interaction's wide-range output; AUC on day_1 0.76979 vs 0.76952 fp32).  Bounds: ~3x the
# worst seen (1.4x for int8 MLPs).
TOLERANCE = {"fp32": 1e-5, "bf16-dense": 1e-2, "int8-tables": 1e-2, "int8-dense": 8e-2}


@dataclass
class CompiledPath:
    """What a target wrote into its folder of a bundle."""

    target: str
    files: list[str]                                   # relative to the path's folder
    options: dict[str, Any] = field(default_factory=dict)


class Target:
    name: ClassVar[str]
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    precision: ClassVar[str] = "fp32"                  # a key of TOLERANCE
    summary: ClassVar[str] = ""                        # one line for `rewrite targets`
    # True when the lowered files hold machine code for the compiling host's ISA tier: the tier is
    # recorded (``options["isa_tier"]``) and a host of a lower tier refuses to load the path.
    native_code: ClassVar[bool] = False

    def unavailable(self) -> str | None:
        """None when this target can run here, else why not (a missing package or device)."""
        return None

    def lower(self, model: RecModel, example: Batch, out_dir: Path, **options: Any) -> CompiledPath:
        raise NotImplementedError

    def load(self, out_dir: Path, compiled: CompiledPath, threads: int | None = None) -> Runner:
        """A runner for the files in ``out_dir``; ``threads`` caps intra-op threads (None: default)."""
        raise NotImplementedError

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.precision]


def register_target(name: str):
    """Class decorator: register a ``Target`` subclass under ``name``."""

    def wrap(cls):
        cls.name = name
        return TARGETS.register(name)(cls)

    return wrap


def get_target(name: str) -> Target:
    return TARGETS.get(name)()


def require_available(target: Target) -> Target:
    why = target.unavailable()
    if why:
        raise RewriteError(f"target {target.name!r} cannot run here: {why}")
    return target


def require_tier(target: Target, compiled: CompiledPath) -> None:
    """RewriteError when ``compiled`` holds machine code for an ISA tier above this host's active
    one (an AVX-512 library on an AVX2 host would die of SIGILL at the first call)."""
    from rewrite.core import isa

    tier = compiled.options.get("isa_tier")
    if target.native_code and tier and isa.rank(tier) > isa.rank(isa.active_tier()):
        raise RewriteError(f"path {target.name!r} was compiled for ISA tier {tier!r}; this host runs "
                           f"{isa.active_tier()!r} ({isa.cpu_model()}): compile the bundle on a host of "
                           f"this tier (or with REWRITE_ISA={isa.active_tier()})")


class ExportedBags(torch.nn.Module):
    """``forward(dense, idx_0, off_0, ..., idx_{F-1}, off_{F-1}) -> logits``: the exported form."""

    def __init__(self, model: RecModel):
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, *bags: torch.Tensor) -> torch.Tensor:
        return self.model.forward_bags(dense, list(bags))


def bag_input_names(n_features: int) -> list[str]:
    return ["dense"] + [n for f in range(n_features) for n in (f"indices_{f}", f"offsets_{f}")]


def example_inputs(example: Batch, n_features: int) -> tuple[torch.Tensor, ...]:
    """An example batch in the exported form (dense, idx_0, off_0, ...), as torch tensors."""
    bags = split_bags_np(example.indices.numpy(), example.offsets.numpy(), n_features)
    return (example.dense, *(torch.from_numpy(b) for b in bags))


def export_program(model: RecModel, example: Batch) -> torch.export.ExportedProgram:
    """``torch.export`` of ``ExportedBags(model)`` with a dynamic batch B (offsets are B + 1) and a
    dynamic lookup count per feature.

    ``backed_size_oblivious``: without it, the contiguity check of ``offsets[1:-1]`` inside
    ``segment_sum`` adds the guard B >= 3, and the program would refuse batches of 1 and 2.
    """
    import torch.fx.experimental._config as fx_config

    n_features = len(model.spec.features)
    batch = torch.export.Dim("batch")
    bag_shapes: list[dict[int, Any]] = []
    for f in range(n_features):
        bag_shapes += [{0: torch.export.Dim(f"lookups_{f}")}, {0: batch + 1}]
    with fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(ExportedBags(model).eval(), example_inputs(example, n_features),
                                   dynamic_shapes=({0: batch}, tuple(bag_shapes)))
