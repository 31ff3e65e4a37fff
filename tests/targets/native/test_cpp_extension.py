"""Kernel modules are named by what they are built from, so two versions never share a cache."""

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
