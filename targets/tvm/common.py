"""What the TVM targets share: Relax compile, the path folder's files, and the runtime runner.

Before: a RecModel.  After, in the path folder:
    model.so            the compiled Relax VM executable (``export_library``; for CUDA the
                        kernels are cubin inside it)
    params.safetensors  every parameter, keyed by its Relax input name, in input order
    model_b<b>.so       with tuning (``tune_trials``, tvm-llvm): a library tuned for exactly b
                        samples, called for batches of that size (``targets.tvm.tuning``)
Running needs only TVM's runtime (``load_module`` + ``runtime.vm.VirtualMachine``) and the
safetensors reader: ``main(dense, idx_0, off_0, ..., *params) -> logits [B]``.
Subclasses say which TVM target to build for (``tvm_target``), which device runs it, and may
add files (``finish``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewrite.core.atomic import atomic_path
from rewrite.core.batch import Batch
from rewrite.core.errors import RewriteError
from rewrite.core.model import RecModel
from targets.base import CompiledPath, Runner, Target

LIBRARY, PARAMS = "model.so", "params.safetensors"


def tvm_missing() -> str | None:
    try:
        import tvm  # noqa: F401
    except ImportError as e:
        return f"apache-tvm is not installed ({e})"
    return None


class TvmTarget(Target):
    """lower: export -> Relax -> compile -> export_library; load: VM on the device."""

    device_kind: str = "cpu"
    option_names: frozenset[str] = frozenset()
    tunable: bool = False                       # accepts tune_trials / tune_batches

    def unavailable(self) -> str | None:
        return tvm_missing()

    def tvm_target(self, options: dict[str, Any]):
        """The ``tvm.target.Target`` to compile for, and the options to record."""
        raise NotImplementedError

    def prepare(self, mod, params: list, names: list[str]):
        """Target-specific rewrites of the imported module before ``build``: returns
        (module, params, names), the parameters still runtime inputs in that order."""
        return mod, params, names

    def build(self, mod, target, options: dict[str, Any]):
        """Relax module -> executable (``tvm.compile``'s per-target default pipeline)."""
        import tvm

        return tvm.compile(mod, target)

    def lower(self, model: RecModel, example: Batch, out_dir: Path, **options: Any) -> CompiledPath:
        """``example`` is not needed: the export traces its own batch and keeps shapes symbolic."""
        if (why := tvm_missing()) is not None:
            raise RewriteError(f"{self.name}: {why}")
        from targets.tvm import relax as tvm_relax, tuning as tvm_tuning

        if not self.tunable and {"tune_trials", "tune_batches"} & set(options):
            raise RewriteError(f"{self.name}: tuning (tune_trials) is not supported by this "
                               "target; tvm-llvm supports it")
        if unknown := set(options) - self.option_names:
            raise RewriteError(f"{self.name}: unknown option(s) {', '.join(sorted(unknown))} "
                               f"(known: {', '.join(sorted(self.option_names))})")
        target, recorded = self.tvm_target(options)
        trials, tune_sizes = tvm_tuning.check_options(options, self.name)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ep = tvm_relax.export(model)
        mod, params, names = self.prepare(*tvm_relax.to_relax(ep, self.name))
        t1 = time.perf_counter()
        try:
            executable = self.build(mod, target, options)
        except RewriteError:
            raise
        except Exception as e:  # noqa: BLE001  (TVM raises many kinds; the CLI wants one line)
            lines = str(e).strip().splitlines() or [type(e).__name__]
            raise RewriteError(f"{self.name}: TVM failed to compile the model: {lines[-1]}") from None
        t2 = time.perf_counter()
        write_library(executable, out_dir / LIBRARY)
        save_params(out_dir / PARAMS, params, names)
        files = [LIBRARY, PARAMS] + self.finish(executable, target, out_dir, recorded)
        recorded.update({
            "params": names, "n_features": len(model.spec.features),
            "import_seconds": round(t1 - t0, 3), "compile_seconds": round(t2 - t1, 3),
        })
        if not trials:
            return CompiledPath(self.name, files, recorded)
        untuned = CompiledPath(self.name, list(files), dict(recorded))
        recorded.update(tvm_tuning.tune_batches(
            mod, target, trials, tune_sizes, out_dir,
            lambda ex, name: write_library(ex, out_dir / name)))
        tuned = CompiledPath(self.name, files + list(recorded["tuned_libraries"].values()), recorded)
        set_threads(1)
        device = self.runtime_device()
        recorded["tune_speedup"] = tvm_tuning.measure_speedup(
            load_runner(out_dir, untuned, device), load_runner(out_dir, tuned, device),
            [model.embeddings[t].rows for t in model.feature_tables], model.spec.n_dense,
            len(model.spec.features), tune_sizes)
        return tuned

    def finish(self, executable, target, out_dir: Path, recorded: dict[str, Any]) -> list[str]:
        """Write target-specific files beside the library; returns their names."""
        return []

    def load(self, out_dir: Path, compiled: CompiledPath, threads: int | None = None) -> Runner:
        if (why := self.unavailable()) is not None:
            raise RewriteError(f"{self.name}: cannot run here: {why}")
        set_threads(threads)
        return load_runner(Path(out_dir), compiled, self.runtime_device())

    def runtime_device(self):
        import tvm

        return tvm.cpu(0) if self.device_kind == "cpu" else tvm.cuda(0)


def write_library(executable, path: Path) -> None:
    with atomic_path(path) as tmp:
        executable.export_library(str(tmp))
        tmp.chmod(0o755)


def set_threads(threads: int | None) -> None:
    """Cap TVM's CPU thread pool (``runtime.config_threadpool(affinity mode 0, n)``)."""
    if threads:
        import tvm

        tvm.get_global_func("runtime.config_threadpool")(0, int(threads))


def save_params(path: Path, params: list, names: list[str]) -> None:
    """Relax parameter tensors -> safetensors (dtypes kept: fp16/bf16 tables stay 2 bytes)."""
    from safetensors.torch import save_file

    tensors = {n: torch.from_dlpack(p).contiguous() for n, p in zip(names, params)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"order": json.dumps(names)})
        tmp.chmod(0o644)


def load_params(path: Path, names: list[str], device) -> list:
    """safetensors -> TVM tensors on ``device`` in the executable's input order."""
    import tvm
    from safetensors import safe_open

    out = []
    with safe_open(str(path), framework="pt") as f:
        have = set(f.keys())
        if lost := [n for n in names if n not in have]:
            raise RewriteError(f"{path}: missing parameter(s) {', '.join(lost[:3])}")
        for n in names:
            # clone: torch's allocator aligns to 64 bytes (TVM requires it); the file's mmap
            # offsets are not aligned.  TVM keeps the torch storage alive through DLPack.
            host = tvm.runtime.from_dlpack(f.get_tensor(n).clone())
            if device.dlpack_device_type() == tvm.cpu(0).dlpack_device_type():
                out.append(host)
            else:
                dev = tvm.runtime.empty(host.shape, host.dtype, device)
                dev.copyfrom(host)
                out.append(dev)
    return out


def load_runner(out_dir: Path, compiled: CompiledPath, device) -> Runner:
    """The runner of a compiled path: numpy in, logits float32 [B] out."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    lib_path = out_dir / LIBRARY
    if not lib_path.exists():
        raise RewriteError(f"{lib_path}: missing compiled library")
    vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), device)
    params = load_params(out_dir / PARAMS, list(compiled.options["params"]), device)
    main = vm["main"]
    tuned = {}                                    # batch size -> main of its tuned library
    for b, name in compiled.options.get("tuned_libraries", {}).items():
        if not (out_dir / name).exists():
            raise RewriteError(f"{out_dir / name}: missing tuned library")
        tuned[int(b)] = VirtualMachine(tvm.runtime.load_module(str(out_dir / name)), device)["main"]
    n_inputs = 1 + 2 * int(compiled.options["n_features"])
    on_cpu = device.dlpack_device_type() == tvm.cpu(0).dlpack_device_type()

    def run(dense: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
        if 1 + len(bags) != n_inputs:
            raise RewriteError(f"{compiled.target}: expected {n_inputs - 1} bag arrays, got {len(bags)}")
        args = to_tvm([np.asarray(dense, dtype=np.float32)]
                      + [np.asarray(b, dtype=np.int64) for b in bags], device)
        out = tuned.get(len(dense), main)(*args, *params)
        return out.numpy() if on_cpu else out.copyto(tvm.cpu(0)).numpy()

    return run


def to_tvm(arrays: list[np.ndarray], device) -> list:
    """numpy -> TVM tensors on ``device``.  On the CPU: zero-copy views of one 64-byte aligned
    copy (53 small inputs: ~35 us, where ``tvm.runtime.tensor`` per array takes ~800 us)."""
    import tvm

    if device.dlpack_device_type() != tvm.cpu(0).dlpack_device_type():
        return [tvm.runtime.tensor(a, device) for a in arrays]
    return [tvm.runtime.from_dlpack(v) if v.size else tvm.runtime.empty(v.shape, str(v.dtype))
            for v in aligned_copies(arrays)]          # numpy leaves empty views unaligned


def aligned_copies(arrays: list[np.ndarray], align: int = 64) -> list[np.ndarray]:
    """Copies of ``arrays`` as views into one buffer, each starting on an ``align``-byte boundary
    (TVM's DLPack import requires 64-byte alignment; numpy only guarantees 16)."""
    starts, end = [], 0
    for a in arrays:
        starts.append(end)
        end += -(-a.nbytes // align) * align
    buf = np.empty(end + align, dtype=np.uint8)
    base = (-buf.ctypes.data) % align
    out = []
    for a, s in zip(arrays, starts):
        view = buf[base + s: base + s + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        out.append(view)
    return out
