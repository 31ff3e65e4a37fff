"""``tvm-cuda``: the model compiled by TVM Relax for an NVIDIA GPU architecture.

Before: RecModel.  After: ``model.so`` (host code + the kernels' CUDA C), ``kernels.cubin`` (that
CUDA C compiled by this machine's ``nvcc`` for ``arch``) and ``params.safetensors``.
Kernels get dlight's default GPU schedules (Matmul, GEMV, Reduction, GeneralReduction, Fallback:
TVM's CUDA pipeline).  TVM 0.27 keeps CUDA C in the library and compiles it when the library is
loaded (``tvm_callback_cuda_compile``); ``load`` registers a callback that serves the prebuilt
cubin for exactly that source (sha256), so a serving machine needs no CUDA compiler, and a
build here proves the generated code compiles for the arch, with no GPU or driver present.
Running needs a CUDA device (``unavailable`` says why not).  arch defaults to the present GPU's
compute capability, else ``DEFAULT_ARCH``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

from rewrite.core.atomic import atomic_path
from rewrite.core.errors import RewriteError
from targets.base import CompiledPath, Runner, register_target
from targets.tvm.common import TvmTarget, load_runner, tvm_missing

DEFAULT_ARCH = "sm_80"      # A100: the oldest arch with bf16 tensor cores that DLRM serving uses
CUBIN = "kernels.cubin"
_PREBUILT: dict[str, bytes] = {}     # sha256 of CUDA source -> cubin, served at library load


def gpu_arch() -> str | None:
    """sm_XY of CUDA device 0, or None without a usable device."""
    import tvm

    dev = tvm.cuda(0)
    if not dev.exist:
        return None
    return "sm_" + str(dev.compute_version).replace(".", "")


def cuda_source(executable) -> str:
    """The CUDA C of every kernel in a built Relax executable (one device module)."""
    def walk(m):
        yield m
        for i in m.imports:
            yield from walk(i)

    mods = [m for m in walk(executable.mod) if m.kind == "cuda"]
    if len(mods) != 1:
        raise RewriteError(f"tvm-cuda: expected one CUDA device module, found {len(mods)}")
    return str(mods[0].inspect_source())


def _serve_prebuilt() -> None:
    """Register the load-time compile callback: prebuilt cubin when known, else TVM's own."""
    import tvm_ffi
    from tvm.support import nvcc

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def compile_or_prebuilt(code):
        key = hashlib.sha256(str(code).encode()).hexdigest()
        if key in _PREBUILT:
            return bytearray(_PREBUILT[key])
        return nvcc.tvm_callback_cuda_compile(code)


@register_target("tvm-cuda")
class TvmCuda(TvmTarget):
    devices = ("cuda",)
    summary = "Apache TVM Relax for NVIDIA GPUs (dlight schedules, cubin built by nvcc; runs only with a GPU)"
    device_kind = "cuda"
    option_names = TvmTarget.option_names | {"arch"}

    def unavailable(self) -> str | None:
        if (why := tvm_missing()) is not None:
            return why
        if gpu_arch() is None:
            return "no CUDA device (the library still builds with --target tvm-cuda)"
        return None

    def tvm_target(self, options: dict[str, Any]):
        import tvm

        arch = str(options.get("arch") or gpu_arch() or DEFAULT_ARCH)
        if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
            raise RewriteError(f"{self.name}: arch must look like sm_80 or sm_90a, got {arch!r}")
        if shutil.which("nvcc") is None:
            raise RewriteError(f"{self.name}: nvcc not found on PATH (needed to build cubin)")
        target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
        return target, {"arch": arch}

    def build(self, mod, target, options: dict[str, Any]):
        import tvm

        with target:
            return tvm.compile(mod, target)

    def finish(self, executable, target, out_dir: Path, recorded: dict[str, Any]) -> list[str]:
        from tvm.support import nvcc

        source = cuda_source(executable)
        with target:
            try:
                cubin = nvcc.compile_cuda(source, target_format="cubin", compiler="nvcc")
            except RuntimeError as e:
                raise RewriteError(f"{self.name}: nvcc failed for {recorded['arch']}: "
                                   f"{str(e).strip().splitlines()[-1]}") from None
        with atomic_path(out_dir / CUBIN) as tmp:
            tmp.write_bytes(bytes(cubin))
            tmp.chmod(0o644)
        recorded["cuda_source_sha256"] = hashlib.sha256(source.encode()).hexdigest()
        return [CUBIN]

    def load(self, out_dir: Path, compiled: CompiledPath, threads: int | None = None) -> Runner:
        if (why := self.unavailable()) is not None:
            raise RewriteError(f"{self.name}: cannot run here: {why}")
        out_dir = Path(out_dir)
        _PREBUILT[compiled.options["cuda_source_sha256"]] = (out_dir / CUBIN).read_bytes()
        _serve_prebuilt()
        return load_runner(out_dir, compiled, self.runtime_device())
