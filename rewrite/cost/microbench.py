"""Micro-benchmarks that measure this machine for the ``cpu-local`` hardware spec.

Each returns plain numbers (units in the names); ``hardware.cpu_local`` turns them into a
``HardwareSpec``.  Time is the calling thread's CPU time (``clock``): on a shared machine other
jobs preempt us for whole scheduler slices, which wall time would count; the runs here are
single-threaded, so on an idle machine CPU time equals wall time.  All timings use torch ops the
representations themselves use (``index_select`` for gathers, ``matmul`` / ``_int_mm`` for
GEMMs), on ``threads`` threads, as the best of repeats.

* gather rate: random 64-byte rows (``index_select``) from tables of several working-set sizes
  -> rows/s; a table larger than the last-level cache measures DRAM.  The same through the fast
  engine's own gather (``engine_gather_rate``), for the host limit a path is compared with.
* streaming bandwidth: a sum over a tensor of a given size -> bytes/s.
* GEMM throughput by dtype and shape -> FLOP/s: fp32 and bf16 through torch (oneDNN, what the
  fast engine's float MLPs run), int8 through the fast engine's own int8 kernel for the active ISA
  tier (``int8_kernel_throughput``: VNNI, AVX2 or ``_int_mm``), since ``torch._int_mm`` has no
  fast kernel below AVX-512 VNNI and would state a limit no path of ours runs at.
* per-op overhead: a one-element add -> s per op.
* cache sizes and cores: sysfs, ``os.sched_getaffinity``; memory: /proc/meminfo.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

ROW_BYTES = 64                 # bytes per gathered row: 16 fp32, one x86 cache line
GATHER_IDS = 1 << 16           # random ids per timed gather
clock = time.thread_time         # s, CPU time of this thread (CLOCK_THREAD_CPUTIME_ID)
REPEATS = 7                    # timed repeats per measurement (fastest taken)


def best_seconds(fn: Callable[[], object], repeats: int = REPEATS, budget_s: float = 0.5) -> float:
    """Fastest wall time of ``fn`` over repeats after one warm-up call (fewer repeats if slow).

    The minimum, not the median: these measure what the machine can do, and the machine is
    shared, so slower repeats are other jobs' interference."""
    t0 = clock()
    fn()
    first = clock() - t0
    n = max(2, min(repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(n):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def gather_rate(working_set_bytes: int, seed: int = 0) -> float:
    """Random rows/s gathered by ``index_select`` from a table of ``working_set_bytes``.

    Fresh ids every repeat: re-gathering the same ids would find their rows still cached."""
    rows = max(1, working_set_bytes // ROW_BYTES)
    table = torch.ones(rows, ROW_BYTES // 4)            # ones, not zeros: every page really mapped
    g = torch.Generator().manual_seed(seed)
    id_sets = iter([torch.randint(0, rows, (GATHER_IDS,), generator=g) for _ in range(REPEATS + 1)])
    out = torch.empty(GATHER_IDS, ROW_BYTES // 4)      # preallocated: time the gather, not malloc
    seconds = best_seconds(lambda: torch.index_select(table, 0, next(id_sets), out=out), budget_s=1e9)
    return GATHER_IDS / seconds


def engine_gather_rate(working_set_bytes: int, seed: int = 0) -> float:
    """Random rows/s the fast engine's own gather (``gather_bags``: rows prefetched ahead, the
    table in 2 MiB pages) pools from a table of ``working_set_bytes``, one 64-byte row per bag;
    RewriteError when the engine's kernels cannot build here.  ``index_select`` issues its loads
    one at a time and states a lower rate than a path of ours reaches."""
    from rewrite.core.embedding import TableBag
    from targets.native.fast_kernels import kernels, store_tables

    rows, dim = max(1, working_set_bytes // ROW_BYTES), ROW_BYTES // 4
    table = TableBag(rows, dim, weight=torch.ones(rows, dim))     # ones: every page really mapped
    gather_bags = kernels().gather_bags
    w, feat, d = store_tables([table], [0], dim).args()
    del table
    g = torch.Generator().manual_seed(seed)
    id_sets = iter([torch.randint(0, rows, (GATHER_IDS,), generator=g) for _ in range(REPEATS + 1)])
    offsets, no_pre = torch.arange(GATHER_IDS + 1), torch.empty(0)
    seconds = best_seconds(lambda: gather_bags(w, next(id_sets), offsets, feat, d, no_pre), budget_s=1e9)
    return GATHER_IDS / seconds


def stream_bandwidth(nbytes: int) -> float:
    """Bytes/s read by a sum over a contiguous fp32 tensor of ``nbytes``."""
    x = torch.ones(max(1, nbytes // 4))
    return x.numel() * 4 / best_seconds(lambda: x.sum())


def gemm_throughput(dtype: str, m: int, k: int, n: int) -> float:
    """FLOP/s of one [m, k] x [k, n] GEMM (2mkn FLOPs) in ``dtype`` (fp32, bf16, int8)."""
    g = torch.Generator().manual_seed(0)
    if dtype == "int8":
        a = torch.randint(-128, 127, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 127, (k, n), dtype=torch.int8, generator=g)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        a, b = torch.randn(m, k, generator=g).to(tdt), torch.randn(k, n, generator=g).to(tdt)
        fn = lambda: a @ b  # noqa: E731
    return 2.0 * m * k * n / best_seconds(fn, budget_s=0.3)


def int8_kernel_throughput(m: int, k: int, n: int) -> tuple[float, str]:
    """(FLOP/s, kernel name) of one int8 [m, k] x [k, n] layer with ReLU run by torch-fast-int8's
    MLP kernel for the active ISA tier, fp32 in and out (the activation quantization included,
    as the engine pays it); 2mkn FLOPs."""
    from torch import nn

    from targets.native.int8_kernels import int8_mlp

    torch.manual_seed(0)
    layer = int8_mlp(nn.Sequential(nn.Linear(k, n), nn.ReLU()))
    x = torch.randn(m, k)
    return 2.0 * m * k * n / best_seconds(lambda: layer(x), budget_s=0.3), type(layer).__name__


def op_overhead() -> float:
    """Seconds per framework op: one-element adds, 2000 in a row."""
    x, y = torch.ones(1), torch.ones(1)

    def many():
        for _ in range(2000):
            torch.add(x, y)

    return best_seconds(many) / 2000


def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def cache_sizes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict[str, int]:
    """Data/unified cache bytes by level from sysfs, e.g. {"L1": 49152, "L2": 1048576, "L3": ...}."""
    out: dict[str, int] = {}
    for idx in sorted(root.glob("index*")):
        try:
            kind = (idx / "type").read_text().strip()
            level = (idx / "level").read_text().strip()
            size = _size((idx / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified"):
            out[f"L{level}"] = size
    return out


def memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
