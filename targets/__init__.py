"""Runnable backends, one per file; importing this package registers the ones listed here."""

from targets import fbgemm_int8, onnx_cpu, torch_compile, torch_eager, torch_fast  # noqa: F401
from targets import tvm_cuda, tvm_llvm  # noqa: F401  (registers tvm-llvm, tvm-cuda)
