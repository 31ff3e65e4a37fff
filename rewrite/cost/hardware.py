"""Hardware specs: presets (published numbers, sources beside each), user JSON, and ``cpu-local``.

``cpu-local`` is this machine, measured by ``microbench`` on ``threads`` threads and cached in
``~/.cache/dlrm-rewrite/hardware.json`` keyed by CPU model, core and thread count and ISA tier (``--refresh``
re-measures).  Measured tiers fold memory-level parallelism into ``latency``: it is the seconds
per random row a gather achieves (parallelism 1), not an unloaded pointer-chase latency.

Presets describe a whole socket / device.  Peak numbers are vendor spec sheets; latencies and
in-flight access counts are typical published figures and marked approximate: they set the
latency-vs-bandwidth balance of random row gathers, nothing else.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from rewrite.core import isa
from rewrite.core.atomic import write_text
from rewrite.cost import microbench as mb
from rewrite.cost.types import HardwareSpec, MemoryTier
from rewrite.core.errors import RewriteError

GB, GiB, MiB, KiB = 1e9, 1 << 30, 1 << 20, 1 << 10
CACHE_ENV = "DLRM_REWRITE_CACHE"          # overrides ~/.cache/dlrm-rewrite (tests use a tmp dir)
HARDWARE_CACHE_VERSION = 3          # 2: keyed by ISA tier; int8 measured on the engine's own kernel;
                                    # 3: the engine's own gather rates too (``rewrite.cost.limit``)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dlrm-rewrite")


def _cpu(name, *, cores, ghz, l2_per_core, llc, dram_gb, dram_bw, dram_ns, fill_buffers,
         fp32_flop_per_cycle, bf16_x, int8_x, notes) -> HardwareSpec:
    """A CPU socket: peak FLOP/s = cores x GHz x FLOP/cycle/core; bf16 / int8 as multiples of fp32.
    L2 ~ 14 cycles, LLC ~ 45 cycles load-to-use (approx., vendor optimisation manuals); cache
    bandwidths 32 B/cycle/core (L2) and 16 B/cycle/core (LLC) (approx., same manuals)."""
    hz = ghz * 1e9
    fp32 = cores * hz * fp32_flop_per_cycle
    return HardwareSpec(
        name=name, kind="cpu", cores=cores, call_overhead=3e-6,   # s/op, torch eager dispatch (approx.)
        tiers=(MemoryTier("l2", l2_per_core * cores, 32 * hz * cores, 14 / hz, fill_buffers * cores, True),
               MemoryTier("llc", llc, 16 * hz * cores, 45 / hz, fill_buffers * cores, True),
               MemoryTier("dram", int(dram_gb * GiB), dram_bw, dram_ns * 1e-9, fill_buffers * cores)),
        gemm={"fp32": ((0.0, fp32),), "bf16": ((0.0, fp32 * bf16_x),), "int8": ((0.0, fp32 * int8_x),)},
        notes=notes)


def _gpu(name, *, hbm_gb, hbm_bw, l2_mb, l2_bw, sms, fp32, bf16, int8, link_bw, notes) -> HardwareSpec:
    """A GPU: HBM random access ~ 500 ns (approx., Jia et al. 'Dissecting the NVIDIA Volta/Turing
    GPU architecture via microbenchmarking', 2018/2019), L2 hit ~ 200 ns (same); in flight: 2048
    threads per SM (CUDA occupancy limit).  Host memory over the link: ~ 1.5 us per access
    (approx., UVM/zero-copy measurements), 512 GiB of host DRAM assumed."""
    inflight = 2048 * sms
    return HardwareSpec(
        name=name, kind="gpu", cores=sms, call_overhead=5e-6,     # s, CUDA kernel launch (approx.)
        tiers=(MemoryTier("l2", int(l2_mb * MiB), l2_bw, 200e-9, inflight, True),
               MemoryTier("hbm", int(hbm_gb * GiB), hbm_bw, 500e-9, inflight),
               MemoryTier("host", 512 * GiB, link_bw, 1.5e-6, inflight)),
        gemm={"fp32": ((0.0, fp32),), "bf16": ((0.0, bf16),), "fp16": ((0.0, bf16),), "int8": ((0.0, int8),)},
        notes=notes)


PRESETS: dict[str, Callable[[], HardwareSpec]] = {
    # Intel Xeon E5-2680 v4 (Broadwell-EP): 14 cores, 2.4 GHz, 35 MB LLC, 256 KB L2/core (Intel ARK);
    # 4 x DDR4-2400 = 76.8 GB/s; AVX2 2 FMA = 32 FP32 FLOP/cycle; no VNNI/bf16: int8 via
    # vpmaddubsw ~ 2x fp32 (FBGEMM, approx.); DRAM ~ 90 ns idle (approx., Intel MLC reports);
    # 10 line-fill buffers per core (Intel optimisation manual).
    "broadwell": lambda: _cpu("broadwell", cores=14, ghz=2.4, l2_per_core=256 * KiB, llc=35 * MiB,
                              dram_gb=256, dram_bw=76.8 * GB, dram_ns=90, fill_buffers=10,
                              fp32_flop_per_cycle=32, bf16_x=1.0, int8_x=2.0,
                              notes="Xeon E5-2680 v4 socket; bf16 emulated (= fp32)"),
    # Intel Xeon Platinum 8280 (Cascade Lake): 28 cores, 2.7 GHz base, 38.5 MB LLC, 1 MB L2/core
    # (Intel ARK); 6 x DDR4-2933 = 140.8 GB/s; AVX-512 2 FMA = 64 FLOP/cycle (at base clock: an
    # upper bound, AVX-512 clocks are lower); VNNI int8 = 4x fp32 (Intel DL Boost); DRAM ~ 80 ns
    # (approx.); 12 fill buffers/core (approx.).
    "cascadelake": lambda: _cpu("cascadelake", cores=28, ghz=2.7, l2_per_core=1 * MiB,
                                llc=int(38.5 * MiB), dram_gb=384, dram_bw=140.8 * GB, dram_ns=80,
                                fill_buffers=12, fp32_flop_per_cycle=64, bf16_x=1.0, int8_x=4.0,
                                notes="Xeon Platinum 8280 socket; no bf16 (= fp32)"),
    # Intel Xeon Platinum 8480+ (Sapphire Rapids): 56 cores, 2.0 GHz base, 105 MB LLC, 2 MB L2/core
    # (Intel ARK); 8 x DDR5-4800 = 307.2 GB/s; AMX: 1024 bf16 / 2048 int8 ops per cycle per core
    # (Intel AMX docs) vs 64 fp32 AVX-512; DRAM ~ 110 ns (approx.); 16 fill buffers/core
    # (Golden Cove, Intel optimisation manual).
    "sapphirerapids": lambda: _cpu("sapphirerapids", cores=56, ghz=2.0, l2_per_core=2 * MiB,
                                   llc=105 * MiB, dram_gb=512, dram_bw=307.2 * GB, dram_ns=110,
                                   fill_buffers=16, fp32_flop_per_cycle=64, bf16_x=16.0, int8_x=32.0,
                                   notes="Xeon Platinum 8480+ socket; bf16/int8 on AMX"),
    # AMD EPYC 9654 (Zen 4): 96 cores, 2.4 GHz base, 384 MB L3, 1 MB L2/core (AMD product page);
    # 12 x DDR5-4800 = 460.8 GB/s; 2 x 256-bit FMA = 32 FP32 FLOP/cycle; AVX512-BF16 dot = 2x,
    # AVX512-VNNI int8 = 4x fp32 (AMD Zen 4 software optimisation guide); DRAM ~ 110 ns (approx.);
    # 24 L1 miss buffers per core (approx., same guide).
    "zen4": lambda: _cpu("zen4", cores=96, ghz=2.4, l2_per_core=1 * MiB, llc=384 * MiB, dram_gb=768,
                         dram_bw=460.8 * GB, dram_ns=110, fill_buffers=24, fp32_flop_per_cycle=32,
                         bf16_x=2.0, int8_x=4.0, notes="EPYC 9654 socket"),
    # NVIDIA V100 SXM2 32 GB (V100 datasheet): HBM2 900 GB/s, 6 MB L2, 80 SMs, FP32 15.7 TFLOP/s,
    # FP16 tensor 125 TFLOP/s, int8 DP4A 62.8 TOP/s (4x FP32); L2 ~ 2.1 TB/s (Jia et al. 2018);
    # PCIe 3.0 x16 = 15.75 GB/s to the host.
    "v100": lambda: _gpu("v100", hbm_gb=32, hbm_bw=900 * GB, l2_mb=6, l2_bw=2.1e12, sms=80,
                         fp32=15.7e12, bf16=125e12, int8=62.8e12, link_bw=15.75 * GB,
                         notes="V100 SXM2 32GB; bf16 row = fp16 tensor cores"),
    # NVIDIA A100 SXM4 80 GB (A100 datasheet): HBM2e 2039 GB/s, 40 MB L2, 108 SMs, FP32 19.5,
    # BF16 312 TFLOP/s, INT8 624 TOP/s (dense); L2 ~ 5 TB/s (approx., NVIDIA Ampere whitepaper
    # "2.3x V100"); PCIe 4.0 x16 = 31.5 GB/s.
    "a100": lambda: _gpu("a100", hbm_gb=80, hbm_bw=2039 * GB, l2_mb=40, l2_bw=5e12, sms=108,
                         fp32=19.5e12, bf16=312e12, int8=624e12, link_bw=31.5 * GB, notes="A100 SXM4 80GB"),
    # NVIDIA H100 SXM5 80 GB (H100 datasheet): HBM3 3.35 TB/s, 50 MB L2, 132 SMs, FP32 67,
    # BF16 989 TFLOP/s, INT8 1979 TOP/s (dense); L2 ~ 7 TB/s (approx.); PCIe 5.0 x16 = 63 GB/s.
    "h100": lambda: _gpu("h100", hbm_gb=80, hbm_bw=3.35e12, l2_mb=50, l2_bw=7e12, sms=132,
                         fp32=67e12, bf16=989e12, int8=1979e12, link_bw=63 * GB, notes="H100 SXM5 80GB"),
    # NVIDIA H200 SXM (H200 datasheet): HBM3e 4.8 TB/s, 141 GB; compute and L2 as H100.
    "h200": lambda: _gpu("h200", hbm_gb=141, hbm_bw=4.8e12, l2_mb=50, l2_bw=7e12, sms=132,
                         fp32=67e12, bf16=989e12, int8=1979e12, link_bw=63 * GB, notes="H200 SXM 141GB"),
    # MP-Rec's "matrix engine with little memory", modelled on Google TPU v4i (Jouppi et al., ISCA'21
    # "Ten lessons from three generations shaped Google's TPUv4i"): 138 TFLOP/s bf16, 138 TOP/s int8,
    # 128 MiB on-chip CMEM (placeable), 8 GiB HBM at 614 GB/s, PCIe 4.0 x16 host link 31.5 GB/s.
    # fp32 runs as bf16 multi-pass (~1/3 rate, approx.); latencies approx. (CMEM ~ 100 ns, HBM ~
    # 500 ns, host ~ 2 us); 4096 accesses in flight (approx.); 10 us per call (host round trip, approx.).
    "accel-matrix": lambda: HardwareSpec(
        name="accel-matrix", kind="accelerator", cores=1, call_overhead=10e-6,
        tiers=(MemoryTier("sram", 128 * MiB, 2e12, 100e-9, 4096),
               MemoryTier("hbm", 8 * GiB, 614 * GB, 500e-9, 4096),
               MemoryTier("host", 512 * GiB, 31.5 * GB, 2e-6, 4096)),
        gemm={"fp32": ((0.0, 46e12),), "bf16": ((0.0, 138e12),), "int8": ((0.0, 138e12),)},
        notes="matrix engine with little memory (TPUv4i-class)"),
    # MP-Rec's "large-SRAM device", modelled on Graphcore Colossus MK2 GC200 (Graphcore IPU
    # datasheet): 900 MB in-processor memory at 47.5 TB/s, 1472 tiles, 62.5 TFLOP/s fp32, 250
    # TFLOP/s fp16; streaming memory (host DDR) ~ 20 GB/s per IPU (approx., IPU-M2000 docs);
    # SRAM access ~ 6 cycles at 1.33 GHz ~ 5 ns per tile, one per tile in flight.
    "accel-sram": lambda: HardwareSpec(
        name="accel-sram", kind="accelerator", cores=1472, call_overhead=10e-6,
        tiers=(MemoryTier("sram", 900 * MiB, 47.5e12, 5e-9, 1472),
               MemoryTier("host", 448 * GiB, 20 * GB, 2e-6, 1472)),
        gemm={"fp32": ((0.0, 62.5e12),), "bf16": ((0.0, 250e12),), "fp16": ((0.0, 250e12),),
              "int8": ((0.0, 250e12),)},
        notes="large-SRAM device (IPU GC200-class)"),
}


def load_hardware(name: str, refresh: bool = False, threads: int = 1, progress: bool = True) -> HardwareSpec:
    """``cpu-local``, a preset name, or a path to a JSON spec (the format ``--json`` prints)."""
    if name == "cpu-local":
        return cpu_local(refresh=refresh, threads=threads, progress=progress)
    if name in PRESETS:
        return PRESETS[name]()
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise RewriteError(f"{path}: no such hardware spec file") from None
        except (OSError, ValueError) as e:
            raise RewriteError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise RewriteError(f"{path}: a hardware spec is a JSON object")
        return HardwareSpec.from_json(data, where=str(path))
    raise RewriteError(f"--hardware: unknown {name!r} (choose cpu-local, "
                       f"{', '.join(sorted(PRESETS))}, or a JSON spec file)")


def cpu_local(refresh: bool = False, threads: int = 1, progress: bool = True) -> HardwareSpec:
    """This machine, measured once per (CPU model, cores, threads) and cached."""
    key = cache_key(threads)
    path = cache_dir() / "hardware.json"
    cached = _read_cache(path)
    if not refresh and key in cached:
        return HardwareSpec.from_json(cached[key], where=f"{path} [{key}]")
    spec = measure_cpu(threads, progress)
    cached[key] = spec.to_json()
    write_text(path, json.dumps({"version": HARDWARE_CACHE_VERSION, "machines": cached}, indent=1))
    return spec


def cache_key(threads: int) -> str:
    """The machine a cached measurement belongs to: CPU model, cores, threads and ISA tier."""
    return f"{isa.cpu_model()}|{mb.cores()} cores|{threads} threads|tier {isa.active_tier()}"


def _read_cache(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return dict(d["machines"]) if d.get("version") == HARDWARE_CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}   # a missing or stale cache is re-measured, never an error


GATHER_SIZES = (32 * KiB, 512 * KiB, 4 * MiB, 16 * MiB, 64 * MiB, 512 * MiB)       # bytes
GEMM_SHAPES = ((64, 64, 64), (256, 128, 128), (512, 256, 256), (1024, 512, 512), (2048, 512, 1024))
GEMM_PASSES = 2     # each GEMM point is the best of this many passes over all of them


def measure_cpu(threads: int = 1, progress: bool = True) -> HardwareSpec:
    """Run the micro-benchmarks (about half a minute) and build the spec."""
    import torch

    say = (lambda m: print(f"[cpu-local] {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    tier = isa.active_tier()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        caches = mb.cache_sizes()
        l2, llc = caches.get("L2", 1 * MiB), caches.get("L3", caches.get("L2", 1 * MiB))
        say(f"{isa.cpu_model()}, {mb.cores()} cores, caches {caches}; measuring on {threads} thread(s)")
        mb.gather_rate(GATHER_SIZES[0])          # warm-up: first-call allocation and dispatch
        gather = {}
        for ws in GATHER_SIZES:
            gather[ws] = mb.gather_rate(ws)
            say(f"gather 64 B rows, working set {ws / MiB:g} MiB: {gather[ws] / 1e6:.1f} M rows/s")
        engine_gather, engine_why = {}, None
        try:
            for ws in GATHER_SIZES:
                engine_gather[ws] = mb.engine_gather_rate(ws)
            say("gather through the fast engine (gather_bags): " +
                ", ".join(f"{ws / MiB:g} MiB {r / 1e6:.1f} M" for ws, r in engine_gather.items()) + " rows/s")
        except RewriteError as e:     # no compiler or no build here: the limit uses index_select's rates
            engine_gather, engine_why = {}, str(e)
            say(f"gather through the fast engine: not measured ({engine_why})")
        stream = {name: mb.stream_bandwidth(size) for name, size in
                  (("l2", l2 // 2), ("llc", llc // 2), ("dram", 256 * MiB))}
        say("stream read: " + ", ".join(f"{k} {v / GB:.1f} GB/s" for k, v in stream.items()))
        gemm: dict[str, list[tuple[float, float]]] = {}
        kernels: dict[str, str] = {"fp32": "torch matmul (oneDNN)"}
        bf16_missing = isa.missing("avx512_bf16")
        if bf16_missing:      # the engine runs its MLPs in fp32 here; an emulated bf16 is no limit
            say(f"gemm bf16: not measured, no bf16 arithmetic at tier {tier}: {bf16_missing}")
        else:
            kernels["bf16"] = "torch matmul (oneDNN)"
        dtypes = [d for d in ("fp32", "bf16", "int8") if not (d == "bf16" and bf16_missing)]
        best: dict[tuple[str, int], float] = {}
        for _ in range(GEMM_PASSES):      # passes apart in time: a burst of load slows one, not all
            for dtype in dtypes:
                for i, (m, k, n) in enumerate(GEMM_SHAPES):
                    if dtype == "int8":
                        rate, kernels["int8"] = mb.int8_kernel_throughput(m, k, n)
                    else:
                        rate = mb.gemm_throughput(dtype, m, k, n)
                    best[dtype, i] = max(rate, best.get((dtype, i), 0.0))
        for dtype in dtypes:
            gemm[dtype] = [(2.0 * m * k * n, best[dtype, i]) for i, (m, k, n) in enumerate(GEMM_SHAPES)]
            say(f"gemm {dtype} ({kernels[dtype]}): " + ", ".join(f"{f / 1e6:.1f} MFLOP {r / 1e9:.0f} GFLOP/s"
                                                                 for f, r in gemm[dtype]))
        overhead = mb.op_overhead()
        say(f"per-op overhead {overhead * 1e6:.2f} us")
    finally:
        torch.set_num_threads(old)
    fits = lambda cap: max((ws for ws in GATHER_SIZES if ws <= cap // 2), default=GATHER_SIZES[0])  # noqa: E731
    cache_l2, cache_llc = gather[fits(l2)], gather[fits(llc)]
    tiers = (
        MemoryTier("l2", l2 * min(threads, mb.cores()), stream["l2"], 1 / cache_l2, 1.0, True),
        MemoryTier("llc", llc, stream["llc"], 1 / cache_llc, 1.0, True),
        MemoryTier("dram", mb.memory_bytes() or 8 * GiB, stream["dram"], 1 / gather[GATHER_SIZES[-1]], 1.0),
    )
    engine_tiers = {"l2": fits(l2), "llc": fits(llc), "dram": GATHER_SIZES[-1]} if engine_gather else {}
    return HardwareSpec(
        name="cpu-local", kind="cpu", tiers=tiers, gemm={k: tuple(sorted(v)) for k, v in gemm.items()},
        call_overhead=overhead, cores=mb.cores(), threads=threads, source="measured",
        notes=f"{isa.cpu_model()}, ISA tier {tier}; measured with torch {torch.__version__}; tier latency = "
              f"s per random 64 B row gathered (parallelism folded in)",
        measurements={"gather_rows_per_s": {str(k): v for k, v in gather.items()},
                      "engine_gather_rows_per_s": {str(k): v for k, v in engine_gather.items()},
                      "engine_tier_row_s": {t: 1 / engine_gather[ws] for t, ws in engine_tiers.items()},
                      **({"engine_gather_missing": engine_why} if engine_why else {}),
                      "stream_bytes_per_s": stream, "caches": caches, "isa_tier": tier,
                      "gemm_kernels": kernels})
