"""Build the C++ kernels in ``targets/native/kernels/`` as torch extensions, once per source version,
machine and ISA tier.

The tier is chosen at load from CPUID (``rewrite.core.isa.active_tier``: the host's highest, or the
one ``REWRITE_ISA`` forces) and the kernels are compiled for it (``isa.compile_flags``:
``-march=native`` at the host's own tier, ``-march=x86-64-v3`` for the AVX2 tier, ...), so the
bundle never carries instructions chosen on another machine.  Each (kernel, tier) is its own
module named by the kernel, the tier and a hash of its sources and flags (``source_digest``),
cached by torch under TORCH_EXTENSIONS_DIR: the ~30 s build happens on first use per machine,
tier and kernel version.  Without a C++ compiler the targets that need
these kernels report themselves unavailable (``compiler_missing``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

from rewrite.core import isa
from rewrite.core.errors import RewriteError

KERNELS = Path(__file__).parent / "kernels"
FLAGS = ["-O3", "-fopenmp-simd"]


def source_digest(source: str, cflags: list[str]) -> str:
    """A hash of what a module is built from: its source, every header under ``kernels/`` with its
    path (``dlrm_fast/*.h`` included; torch's cache does not follow includes, so any header the
    source may include counts) and the flags.  It is part of the module's name, so two versions of
    a kernel (two checkouts, an upgrade) never share a cache directory or a loaded module: torch's
    own versioning rebuilds in place, and a process could load the other version's binary."""
    h = hashlib.sha1((KERNELS / source).read_bytes())
    for header in sorted(KERNELS.rglob("*.h")):
        h.update(header.relative_to(KERNELS).as_posix().encode() + b"\0")
        h.update(header.read_bytes())
    h.update(" ".join(cflags).encode())
    return h.hexdigest()[:10]


def compiler_missing() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return f"no C++ compiler ({compiler} or g++ on PATH) to build the kernels in {KERNELS}"
    return None


def usable_or_why(probe, *features: str) -> str | None:
    """Why a process cannot run an extension's kernels at the active tier (a CPU feature it lacks
    or the tier masks, no compiler, a failed build, or what ``probe()``, the extension's own
    check, returns), or None when it can.  The features are checked before anything is built."""
    why = isa.missing(*features) if features else None
    if why:
        return why
    why = compiler_missing()
    if why:
        return why
    try:
        return probe() or None
    except RewriteError as e:      # e.g. a compiler without the needed -m flags
        return str(e)


def build(name: str, source: str, flags: tuple[str, ...] = ()):
    """The compiled module ``name`` from ``targets/native/kernels/<source>`` for the active ISA tier
    (``flags`` added to the tier's); RewriteError if it cannot build."""
    return _build(name, source, flags, isa.active_tier())


@functools.lru_cache(maxsize=None)
def _build(name: str, source: str, flags: tuple[str, ...], tier: str):
    why = compiler_missing()
    if why:
        raise RewriteError(why)
    from torch.utils.cpp_extension import load

    cflags = FLAGS + isa.compile_flags(tier) + list(flags)
    module = f"{name}_{tier}_{source_digest(source, cflags)}"
    try:
        return load(name=module, sources=[str(KERNELS / source)], extra_cflags=cflags, verbose=False)
    except Exception as e:  # the build raises RuntimeError / subprocess errors with the compiler log
        raise RewriteError(f"building {source} for ISA tier {tier!r} failed: {str(e).splitlines()[0][:200]}") from None
