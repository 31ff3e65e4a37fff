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
