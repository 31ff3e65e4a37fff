"""dlrm-rewrite: rewrite a trained DLRM's embedding tables, compile, and choose a path.

    model = rewrite.load("model.pt")
    gm, sites = rewrite.capture(model)
    prof = rewrite.profile(model, rewrite.data.open("day_0.npz"))
    rw, report = rewrite.apply(model, [passes.quantize(bits=4)], profile=prof)

Names are imported on first use (PEP 562), so ``import rewrite.runtime`` in a server loads only
the runtime side, not the checkpoint readers, profiler or tracer.
"""

from importlib import import_module

from rewrite.core import isa as _isa

_isa.cap_third_party_kernels()     # REWRITE_ISA=<tier> caps torch and oneDNN too, before they load

__version__ = "0.1.0"

_EXPORTS = {
    "data": ("rewrite.data", None),
    "Batch": ("rewrite.core.batch", "Batch"),
    "RewriteError": ("rewrite.core.errors", "RewriteError"),
    "VerificationError": ("rewrite.core.errors", "VerificationError"),
    "load": ("rewrite.formats", "load"),
    "save": ("rewrite.core.model_file", "save"),
    "ModelSpec": ("rewrite.core.model", "ModelSpec"),
    "RecModel": ("rewrite.core.model", "RecModel"),
    "apply": ("rewrite.pass_manager", "apply"),
    "compile": ("rewrite.api", "compile"),
    "plan": ("rewrite.api", "plan"),
    "runtime": ("rewrite.runtime", None),
    "AccessProfile": ("rewrite.core.access_profile", "AccessProfile"),
    "profile": ("rewrite.profiling", "profile"),
    "EmbeddingSite": ("rewrite.core.tracing", "EmbeddingSite"),
    "capture": ("rewrite.core.tracing", "capture"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rewrite' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = import_module(module) if attr is None else getattr(import_module(module), attr)
    globals()[name] = value
    return value
