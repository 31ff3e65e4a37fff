"""``torch-compile``: TorchInductor ahead of time (AOTInductor) for CPU.

Before: a RecModel.  After: ``model.pt2``, an AOTInductor package (generated C++ compiled to a
shared library, with the weights) of the ``torch.export`` program of ``ExportedBags(model)``
with a dynamic batch and dynamic lookup counts; loading it needs no compiler and no Python
model code (``torch._inductor.aoti_load_package``).  Compiling needs a C++ compiler (gcc/clang).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewrite.core import isa
from rewrite.core.batch import Batch
from rewrite.core.errors import RewriteError
from rewrite.core.model import RecModel
from targets.base import CompiledPath, Runner, Target, export_program, register_target

PACKAGE_FILE = "model.pt2"


def inductor_tier() -> str:
    """The ISA tier of the vector code Inductor generates here (its own pick from CPUID and
    ``ATEN_CPU_CAPABILITY``), capped at the active tier."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    picked = str(pick_vec_isa())
    tier = "avx512" if picked.startswith("avx512") else "avx2" if picked.startswith("avx2") else "generic"
    return min(tier, isa.active_tier(), key=isa.rank)


@register_target("torch-compile")
class TorchCompile(Target):
    summary = "TorchInductor AOT (C++ shared library in a .pt2 package) on CPU"
    native_code = True

    def unavailable(self) -> str | None:
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None and shutil.which("c++") is None:
            return f"no C++ compiler ({compiler} or c++ on PATH) for TorchInductor to build with"
        return None

    def lower(self, model: RecModel, example: Batch, out_dir: Path, **options: Any) -> CompiledPath:
        program = export_program(model, example)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / PACKAGE_FILE))
        except Exception as e:  # inductor raises many types (CppCompileError, InductorError, ...)
            raise RewriteError(f"torch-compile: TorchInductor failed: {str(e).splitlines()[0]}") from None
        return CompiledPath(self.name, [PACKAGE_FILE], {"compiler": "aoti", "isa_tier": inductor_tier()})

    def load(self, out_dir: Path, compiled: CompiledPath, threads: int | None = None) -> Runner:
        if threads:
            torch.set_num_threads(threads)
        package = torch._inductor.aoti_load_package(str(out_dir / PACKAGE_FILE))

        @torch.inference_mode()
        def run(dense: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
            return package(torch.from_numpy(dense), *(torch.from_numpy(b) for b in bags)).numpy()

        return run
