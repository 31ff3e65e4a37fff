"""``tvm-llvm``: the model compiled by TVM Relax for this host's CPU, run by the Relax VM.

Before: RecModel.  After: ``model.so`` + ``params.safetensors`` (see ``targets.tvm.common``).
The CPU is named explicitly from LLVM's host query (``llvm_get_system_cpu``, e.g. znver5):
TVM 0.27 rejects "-mcpu" strings and silently treats mcpu="native" as a generic x86-64, which
loses AVX-512.  The library is therefore for this CPU model (or a newer one of its family).
MLP Linear layers become the packed register-blocked kernel of ``targets.tvm.dense`` (their
weights packed into constants at compile time), the dot interaction one kernel of
``targets.tvm.interaction``; other matmuls get the vectorised schedule of
``targets.tvm.schedules`` (TVM has no CPU default).
Options (optional, off by default): ``tune_trials`` N and ``tune_batches`` (default 512, 2048):
meta-schedule libraries for those exact batch sizes (``targets.tvm.tuning``; extra ``tune``).
"""

from __future__ import annotations

from typing import Any

from rewrite.core import isa
from targets.base import register_target
from targets.tvm.common import TvmTarget


# LLVM CPU names that stand for an ISA tier below the host's (``REWRITE_ISA``): the oldest CPU
# with that tier's features, so the library uses nothing the tier masks.
TIER_CPU = {"generic": "x86-64-v2", "avx2": "haswell", "avx512": "skylake-avx512"}


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (what clang's -mcpu=native resolves to), or the tier's
    stand-in when ``REWRITE_ISA`` forces a lower tier."""
    from tvm.target import codegen

    tier = isa.active_tier()
    if tier != isa.host_tier() and isa.is_x86():
        return TIER_CPU[tier]
    return str(codegen.llvm_get_system_cpu())


@register_target("tvm-llvm")
class TvmLlvm(TvmTarget):
    devices = ("cpu",)
    summary = "Apache TVM Relax for the host CPU (mcpu from the LLVM host query), relax VM"
    device_kind = "cpu"
    native_code = True
    option_names = frozenset({"tune_trials", "tune_batches"})
    tunable = True

    def tvm_target(self, options: dict[str, Any]):
        import tvm

        cpu = host_cpu()
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu}), {"mcpu": cpu}

    def prepare(self, mod, params: list, names: list[str]):
        from targets.tvm.dense import pack_dense_layers
        from targets.tvm.interaction import fuse_dot_interaction

        mod, params, names = pack_dense_layers(mod, params, names)
        return fuse_dot_interaction(mod), params, names

    def build(self, mod, target, options: dict[str, Any]):
        import tvm

        from targets.tvm.schedules import cpu_pipeline

        return tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
