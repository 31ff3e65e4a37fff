"""Build the C++ kernels in ``targets/kernels/`` as torch extensions, once per source version.

``torch.utils.cpp_extension.load`` compiles with ``-O3 -march=native`` (the kernels are for the
machine that serves) and caches the module under TORCH_EXTENSIONS_DIR, keyed by the source hash,
so the ~30 s build happens on first use per machine.  Without a C++ compiler the targets that
need these kernels report themselves unavailable (``compiler_missing``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

from rewrite.errors import RewriteError

KERNELS = Path(__file__).parent / "kernels"
FLAGS = ["-O3", "-march=native", "-fopenmp-simd"]


def headers_flag() -> str:
    """A define carrying the hash of ``kernels/*.h``: torch keys its cache on the sources and the
    flags, not on included headers, so a header edit must change the flags to rebuild."""
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(KERNELS.glob("*.h")))).hexdigest()[:12]
    return f"-DDLRM_KERNEL_HEADERS=0x{digest}"


def compiler_missing() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return f"no C++ compiler ({compiler} or g++ on PATH) to build the kernels in {KERNELS}"
    return None


def usable_or_why(probe) -> str | None:
    """Why a process cannot run an extension's kernels (no compiler, a failed build, or what
    ``probe()``, the extension's own CPU check, returns), or None when it can."""
    why = compiler_missing()
    if why:
        return why
    try:
        return probe() or None
    except RewriteError as e:      # e.g. a compiler without the needed -m flags
        return str(e)


@functools.lru_cache(maxsize=None)
def build(name: str, source: str, flags: tuple[str, ...] = ()):
    """The compiled module ``name`` from ``targets/kernels/<source>`` (``flags`` added to FLAGS);
    RewriteError if it cannot build."""
    why = compiler_missing()
    if why:
        raise RewriteError(why)
    from torch.utils.cpp_extension import load

    try:
        return load(name=name, sources=[str(KERNELS / source)], extra_cflags=FLAGS + [headers_flag(), *flags], verbose=False)
    except Exception as e:  # the build raises RuntimeError / subprocess errors with the compiler log
        raise RewriteError(f"building {source} failed: {str(e).splitlines()[0][:200]}") from None
