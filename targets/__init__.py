"""Runnable backends: one per file, each lowers a captured model and runs it."""

from targets import tvm_cuda, tvm_llvm  # noqa: F401  (registers tvm-llvm, tvm-cuda)
