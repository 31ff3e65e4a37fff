"""``rewrite.core.isa``: the host's tier from its CPUID flags, the REWRITE_ISA switch, masking."""

import os
import subprocess
import sys

import pytest

from rewrite.core import isa
from rewrite.core.errors import RewriteError


def test_host_tier_follows_the_flags(monkeypatch):
    for flags, tier in ((set(), "generic"), ({"avx2", "fma", "f16c"}, "avx2"),
                        ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx512"),
                        ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, "generic"),   # no f16c
                        ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "amx_tile",
                          "amx_bf16"}, "amx")):
        monkeypatch.setattr(isa, "host_features", lambda flags=flags: frozenset(flags))
        monkeypatch.setattr(isa, "is_x86", lambda: True)
        assert isa.host_tier() == tier
        assert isa.available_tiers() == list(isa.TIERS[:isa.rank(tier) + 1])


def test_the_real_host_has_a_tier_and_avx2_implies_its_flags():
    tier = isa.host_tier()
    assert tier in isa.TIERS
    if isa.rank(tier) >= isa.rank("avx2"):
        assert {"avx2", "fma", "f16c"} <= isa.host_features()
    assert isa.describe()["host_tier"] == tier


def test_forcing_a_lower_tier_masks_the_features_above_it(monkeypatch):
    monkeypatch.setattr(isa, "host_features", lambda: frozenset(
        {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}))
    monkeypatch.setattr(isa, "is_x86", lambda: True)
    monkeypatch.delenv(isa.ENV, raising=False)
    monkeypatch.delenv(isa.CPU_FLAGS_ENV, raising=False)
    assert isa.active_tier() == "avx512" and isa.has("avx512_vnni")
    monkeypatch.setenv(isa.ENV, "avx2")
    assert isa.active_tier() == "avx2"
    assert isa.missing("avx512_vnni") == "avx512_vnni is above the forced ISA tier 'avx2' (REWRITE_ISA)"
    assert isa.has("fma")
    assert "lacks amx_tile" in isa.missing("amx_tile")
    assert isa.compile_flags() == ["-march=x86-64-v3", "-mtune=native"]
    assert isa.compile_flags("avx512") == ["-march=native"]


def test_a_tier_above_the_host_or_unknown_is_an_error_naming_it(monkeypatch):
    monkeypatch.setattr(isa, "host_features", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setattr(isa, "is_x86", lambda: True)
    with pytest.raises(RewriteError, match=r"ISA tier 'avx512' needs avx512bw, avx512dq, avx512f, avx512vl"):
        isa.check_tier("avx512")
    monkeypatch.setenv(isa.ENV, "sse9")
    with pytest.raises(RewriteError, match=r"unknown ISA tier 'sse9' \(known: generic, avx2, avx512, amx\)"):
        isa.active_tier()


def test_forcing_caps_torch_and_onednn_in_a_fresh_process():
    env = dict(os.environ, REWRITE_ISA="avx2")
    env.pop("ATEN_CPU_CAPABILITY", None)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    code = ("import os, rewrite, torch; print(os.environ['ATEN_CPU_CAPABILITY'], "
            "os.environ['ONEDNN_MAX_CPU_ISA'], torch.backends.cpu.get_cpu_capability())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    aten, onednn, torch_cap = out.stdout.split()
    assert (aten, onednn) == ("avx2", "AVX2")
    if isa.rank(isa.host_tier()) >= isa.rank("avx2"):
        assert torch_cap == "AVX2"


def test_the_process_cap_is_the_tier_named_at_start_only():
    env = dict(os.environ, REWRITE_ISA="avx2")
    code = "import os, rewrite; from rewrite.core import isa; os.environ['REWRITE_ISA'] = 'generic'; print(isa.process_cap())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "avx2"


X86_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma f16c\n"
AARCH64_CPUINFO = ("processor\t: 0\nFeatures\t: fp asimd aes crc32 atomics asimddp\n"
                   "CPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")


def test_the_features_are_the_line_the_hosts_own_isa_writes():
    assert isa.parse_features(X86_CPUINFO, x86=True) == {"fpu", "sse2", "avx2", "fma", "f16c"}
    assert isa.parse_features(AARCH64_CPUINFO, x86=False) == {"fp", "asimd", "aes", "crc32", "atomics", "asimddp"}
    # an aarch64 process under qemu-user reads its x86 host's file: avx2 is no feature of its CPU
    assert isa.parse_features(X86_CPUINFO, x86=False) == frozenset()
    assert isa.parse_features(AARCH64_CPUINFO, x86=True) == frozenset()


def test_an_aarch64_host_builds_for_its_own_cpu_or_the_flags_it_is_given(monkeypatch):
    monkeypatch.setattr(isa, "is_x86", lambda: False)
    monkeypatch.setattr(isa.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(isa, "host_features", lambda: frozenset({"fp", "asimd"}))
    monkeypatch.delenv(isa.ENV, raising=False)
    monkeypatch.delenv(isa.CPU_FLAGS_ENV, raising=False)
    assert isa.host_tier() == "generic"
    assert isa.compile_flags() == ["-mcpu=native"]
    monkeypatch.setenv(isa.CPU_FLAGS_ENV, "  -mcpu=neoverse-n1   -mtune=neoverse-n1 ")   # a cross compiler
    assert isa.compile_flags() == ["-mcpu=neoverse-n1", "-mtune=neoverse-n1"]
    assert "lacks avx2" in isa.missing("avx2")


def test_cpu_flags_on_x86_are_an_error_naming_the_tier_switch(monkeypatch):
    monkeypatch.setattr(isa, "host_features", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setattr(isa, "is_x86", lambda: True)
    monkeypatch.delenv(isa.ENV, raising=False)
    monkeypatch.setenv(isa.CPU_FLAGS_ENV, "-mcpu=neoverse-n1")
    with pytest.raises(RewriteError, match=r"REWRITE_CPU_FLAGS sets the CPU flags of a non-x86 host.*REWRITE_ISA"):
        isa.compile_flags()


def test_the_cpu_is_named_on_x86_and_on_arm():
    assert isa.parse_cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t: fpu avx2\n") == "AMD EPYC 9R14"
    graviton3 = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
    assert isa.parse_cpu_model(graviton3) == "Arm Neoverse-V1"
    other = "Features\t: fp asimd\nCPU implementer\t: 0x61\nCPU part\t: 0x022\n"
    assert isa.parse_cpu_model(other) == "CPU implementer 0x61 part 0x022"
