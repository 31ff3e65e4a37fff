"""Kernel modules are named by what they are built from, so two versions never share a cache;
every kernel source builds for aarch64."""

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

from targets.native import cpp_extension


def test_the_module_digest_follows_the_source_every_header_and_the_flags(tmp_path, monkeypatch):
    (tmp_path / "k.cpp").write_text("int f() { return 1; }\n")
    (tmp_path / "a.h").write_text("// a\n")
    monkeypatch.setattr(cpp_extension, "KERNELS", tmp_path)
    base = cpp_extension.source_digest("k.cpp", ["-O3"])
    assert cpp_extension.source_digest("k.cpp", ["-O3"]) == base                 # stable
    assert cpp_extension.source_digest("k.cpp", ["-O3", "-mavx2"]) != base       # flags
    (tmp_path / "a.h").write_text("// a, edited\n")
    edited_header = cpp_extension.source_digest("k.cpp", ["-O3"])
    assert edited_header != base                                                  # a header it may include
    (tmp_path / "k.cpp").write_text("int f() { return 2; }\n")
    assert cpp_extension.source_digest("k.cpp", ["-O3"]) not in (base, edited_header)   # the source


def test_a_header_in_a_subfolder_or_a_renamed_one_changes_the_digest(tmp_path, monkeypatch):
    """dlrm_fast.cpp is its headers in kernels/dlrm_fast/: an edit there must rebuild the module."""
    (tmp_path / "k.cpp").write_text('#include "part/a.h"\n')
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "a.h").write_text("// a\n")
    monkeypatch.setattr(cpp_extension, "KERNELS", tmp_path)
    base = cpp_extension.source_digest("k.cpp", ["-O3"])
    (tmp_path / "part" / "a.h").write_text("// a, edited\n")
    edited = cpp_extension.source_digest("k.cpp", ["-O3"])
    assert edited != base
    (tmp_path / "part" / "a.h").rename(tmp_path / "part" / "b.h")
    assert cpp_extension.source_digest("k.cpp", ["-O3"]) not in (base, edited)


CROSS = "aarch64-linux-gnu-g++"


@pytest.mark.slow
def test_every_kernel_compiles_for_aarch64():
    """The generic tier is what an aarch64 host builds: every kernel source, with no x86 flags,
    must compile there (its x86 tiers behind their feature macros).  A compile check with the
    cross compiler (Debian's g++-aarch64-linux-gnu); ``.ci/aarch64-qemu`` builds and runs the
    kernel tests on aarch64 under qemu-user (too slow for every run)."""
    if shutil.which(CROSS) is None:
        pytest.skip(f"no aarch64 cross compiler ({CROSS}: apt-get install g++-aarch64-linux-gnu)")
    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++20", "-O2", "-fsyntax-only", "-fopenmp-simd", "-DTORCH_EXTENSION_NAME=aarch64_check",
             *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}"]
    sources = sorted(cpp_extension.KERNELS.glob("*.cpp"))

    def compile_one(source):
        return source.name, subprocess.run([CROSS, *flags, str(source)], capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = dict(pool.map(compile_one, sources))
    failed = {name: r.stderr[-2000:] for name, r in results.items() if r.returncode != 0}
    assert len(results) >= 5 and not failed, failed
