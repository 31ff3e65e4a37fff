"""Runnable backends, one package each, the contract in ``targets/base.py``.

This package is the one place that lists them: importing it registers every target
(``targets.base.TARGETS``, which imports it on its first lookup).

    pytorch/  torch (eager, the reference), torch-bf16, torch-compile (AOTInductor)
    native/   torch-fast, torch-fast-int8: our C++ kernels in ISA tiers (``native/kernels/``)
    onnx/     onnx-cpu, onnx-cpu-int8, onnx-cuda (onnxruntime)
    tvm/      tvm-llvm, tvm-cuda (Apache TVM Relax)
    fbgemm/   fbgemm-int8 (FBGEMM's table-batched embedding: the contender users compare with)
"""

from targets.pytorch import compile, eager  # noqa: F401
from targets.native import engine  # noqa: F401
from targets.onnx import cpu  # noqa: F401
from targets.tvm import cuda, llvm  # noqa: F401
from targets.fbgemm import int8  # noqa: F401
