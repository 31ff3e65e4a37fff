"""The CPU's instruction-set tier, read at run time, and the switch that forces a lower one.

Tiers, lowest first (FBGEMM's dispatch model: one decision per process from CPUID, a gate that
forces a lower path):

    generic   what every host runs (aarch64, or x86-64 without AVX2): portable C++ the compiler
              vectorises for the host
    avx2      AVX2 + FMA + F16C (x86-64-v3: every x86-64 server since 2013)
    avx512    AVX-512 F/BW/VL/DQ (x86-64-v4), with VNNI and BF16 where the CPU has them
    amx       AMX tiles (bf16, int8) on top of avx512

``REWRITE_ISA=<tier>`` in the environment forces a lower tier: every kernel choice then behaves
as on a host of that tier (its features above the tier are masked, its C++ kernels are built
with that tier's ``-march``), so an AVX-512 host also tests the AVX2 path.  Set at process
start, it also caps torch's own kernels (``ATEN_CPU_CAPABILITY``) and oneDNN's
(``ONEDNN_MAX_CPU_ISA``) unless those are set already.  A tier above the host is an error.
The features come from the kernel's CPUID report (``/proc/cpuinfo``).

On a non-x86 host (aarch64: the generic tier only) the kernels are built with ``-mcpu=native``;
``REWRITE_CPU_FLAGS="-mcpu=neoverse-n1"`` (compiler flags, split on whitespace) replaces it where
the compiler cannot read the CPU, e.g. a cross compiler driven by an emulated aarch64 Python
(``.ci/aarch64-qemu``).  On x86-64 the tier picks the flags and setting it is an error.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

from rewrite.core.errors import RewriteError

TIERS = ("generic", "avx2", "avx512", "amx")
ENV = "REWRITE_ISA"
CPU_FLAGS_ENV = "REWRITE_CPU_FLAGS"

# The CPUID flags each tier needs (names as /proc/cpuinfo prints them).
REQUIRES = {
    "generic": frozenset(),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    "amx": frozenset({"amx_tile", "amx_bf16"}),
}
# torch's and oneDNN's names for the same caps (their documented environment switches).
ATEN_CAPABILITY = {"generic": "default", "avx2": "avx2", "avx512": "avx512", "amx": "avx512"}
ONEDNN_ISA = {"generic": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE_BF16", "amx": "ALL"}


@functools.lru_cache(maxsize=None)
def host_features() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (x86 ``flags``, aarch64 ``Features``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return parse_features(text, is_x86())


def parse_features(cpuinfo: str, x86: bool) -> frozenset[str]:
    """The first CPU's flags in a ``/proc/cpuinfo`` text: the ``flags`` line on x86-64, the
    ``Features`` line elsewhere (an x86 flag such as avx2 never counts on another ISA, e.g. an
    aarch64 process under qemu-user that reads its x86 host's file)."""
    wanted = "flags" if x86 else "Features"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == wanted:
            return frozenset(value.split())
    return frozenset()


# Arm's own cores by "CPU part" (implementer 0x41): Neoverse-N1 is AWS Graviton2's core, V1
# Graviton3's, V2 Graviton4's and NVIDIA Grace's.
ARM_PARTS = {"0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2",
             "0xd8e": "Neoverse-N3", "0xd84": "Neoverse-V3", "0xd0b": "Cortex-A76", "0xd41": "Cortex-A78"}


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        return parse_cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor() or platform.machine()


def parse_cpu_model(cpuinfo: str) -> str:
    """The CPU's name in a ``/proc/cpuinfo`` text: x86's ``model name``; on Arm, which prints no
    name, the core named from its implementer and part numbers (``ARM_PARTS``), else those numbers."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model name"):
        if fields.get(key):
            return fields[key]
    part, implementer = fields.get("CPU part", ""), fields.get("CPU implementer", "")
    if implementer == "0x41" and part in ARM_PARTS:
        return f"Arm {ARM_PARTS[part]}"
    if part:
        return f"CPU implementer {implementer or '?'} part {part}"
    return platform.processor() or platform.machine()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def host_tier() -> str:
    """The highest tier this CPU supports."""
    if not is_x86():
        return "generic"
    flags = host_features()
    best = "generic"
    for tier in TIERS[1:]:
        if not REQUIRES[tier] <= flags:
            break
        best = tier
    return best


def rank(tier: str) -> int:
    return TIERS.index(tier)


def check_tier(tier: str) -> str:
    """``tier`` if this host can run it, else RewriteError naming what it lacks."""
    if tier not in TIERS:
        raise RewriteError(f"unknown ISA tier {tier!r} (known: {', '.join(TIERS)})")
    if rank(tier) > rank(host_tier()):
        lacking = sorted(set().union(*(REQUIRES[t] for t in TIERS[1:rank(tier) + 1])) - host_features())
        raise RewriteError(f"ISA tier {tier!r} needs {', '.join(lacking)}, which this CPU ({cpu_model()}) "
                           f"lacks; its highest tier is {host_tier()!r}")
    return tier


def active_tier() -> str:
    """The tier kernels are chosen for: ``$REWRITE_ISA`` if set (read on every call, so tests can
    switch tiers in one process), else the host's highest."""
    forced = os.environ.get(ENV, "").strip().lower()
    return check_tier(forced) if forced else host_tier()


def tier_of(feature: str) -> str:
    """The lowest tier that owns a CPUID flag (an AVX-512 flag belongs to avx512, and so on)."""
    if feature.startswith("amx"):
        return "amx"
    if feature.startswith("avx512") or feature == "avx_ne_convert":
        return "avx512"
    if feature in ("avx2", "fma", "f16c", "avx_vnni", "bmi2"):
        return "avx2"
    return "generic"


def missing(*features: str, tier: str | None = None) -> str | None:
    """Why the active tier (or ``tier``) cannot use every one of ``features``, or None."""
    tier = tier or active_tier()
    absent = [f for f in features if f not in host_features()]
    if absent:
        return f"this CPU ({cpu_model()}) lacks {', '.join(absent)}"
    masked = [f for f in features if rank(tier_of(f)) > rank(tier)]
    if masked:
        return f"{', '.join(masked)} is above the forced ISA tier {tier!r} ({ENV})"
    return None


def has(*features: str, tier: str | None = None) -> bool:
    return missing(*features, tier=tier) is None


def compile_flags(tier: str | None = None) -> list[str]:
    """``-m`` flags that build C++ kernels for ``tier`` on this host: ``-march=native`` at the
    host's own tier, a named ``-march`` below it (the build never uses what the tier masks);
    ``-mcpu=native`` on aarch64, or ``$REWRITE_CPU_FLAGS`` there."""
    tier = check_tier(tier or active_tier())
    override = os.environ.get(CPU_FLAGS_ENV, "").split()
    if not is_x86():
        if override:
            return override
        return ["-mcpu=native"] if platform.machine().lower() in ("aarch64", "arm64") else []
    if override:
        raise RewriteError(f"{CPU_FLAGS_ENV} sets the CPU flags of a non-x86 host; on x86-64 the ISA tier "
                           f"picks them ({ENV}=generic|avx2|avx512|amx)")
    if tier == host_tier():
        return ["-march=native"]
    if tier == "avx512":      # an AMX host building its AVX-512 tier
        return ["-march=native", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]
    return {"avx2": ["-march=x86-64-v3", "-mtune=native"], "generic": ["-march=x86-64-v2", "-mtune=native"]}[tier]


def available_tiers() -> list[str]:
    """Every tier this host can run, lowest first (what the tests run the kernels at)."""
    return list(TIERS[:rank(host_tier()) + 1])


def describe() -> dict[str, str]:
    """What a bundle's manifest and ``rewrite bench`` record: the CPU, its tier, the tier used."""
    return {"cpu": cpu_model(), "arch": platform.machine(), "host_tier": host_tier(), "tier": active_tier()}


_process_cap: str | None = None


def cap_third_party_kernels() -> None:
    """With ``$REWRITE_ISA`` set, cap torch's and oneDNN's own dispatch at the same tier (their
    documented switches; read once, when each library first picks a kernel)."""
    global _process_cap
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in TIERS:
        _process_cap = forced
        os.environ.setdefault("ATEN_CPU_CAPABILITY", ATEN_CAPABILITY[forced])
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", ONEDNN_ISA[forced])


def process_cap() -> str | None:
    """The tier ``$REWRITE_ISA`` named when this process started (torch and oneDNN are capped
    there for the life of the process: a higher tier set later cannot lift them), or None."""
    return _process_cap
