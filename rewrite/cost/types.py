"""The cost model's plain data: hardware, variants, costs, footprints (TorchRec-planner shape).

Units everywhere: bytes, seconds, bytes/s, FLOP/s.  Every estimated number carries where it came
from (``Source``): ``spec`` (a preset's published constants), ``measured`` (timed or evaluated
here), ``counted`` (exact: bytes summed over a representation's tensors), ``calibrated`` (the
model with constants fitted to measurements on this machine) or ``estimated`` (the model with
uncalibrated constants); ``unmeasured`` marks a quantity that could not be measured (an AUC
change without labels: recorded as 0).

Memory tiers, fastest first.  A ``managed`` tier is a hardware cache: nothing is placed in it, it
holds the hottest rows of whatever is placed below it.  The other tiers are where bytes live (HBM,
DRAM, SRAM of an accelerator, host memory over a link), each with its capacity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from rewrite.core.errors import RewriteError

Source = Literal["spec", "measured", "counted", "calibrated", "estimated", "unmeasured"]
DTYPES = ("fp32", "bf16", "fp16", "int8")
LINE_BYTES = 64          # bytes per random access granule: x86 cache line (Intel/AMD optimisation manuals)


@dataclass(frozen=True)
class MemoryTier:
    name: str                 # "l2", "llc", "dram", "hbm", "sram", "host", ...
    capacity: int             # bytes
    bandwidth: float          # bytes/s, streaming reads, whole device
    latency: float            # s, one random access
    parallelism: float = 1.0  # random accesses in flight on the whole device
    managed: bool = False     # a hardware cache (holds hot rows of lower tiers; nothing placed in it)

    @property
    def access_time(self) -> float:
        """Seconds per random access at full parallelism: latency / parallelism."""
        return self.latency / self.parallelism

    def row_time(self, row_bytes: float) -> float:
        """Seconds to fetch one random row of ``row_bytes``: one access latency (the row's lines
        are adjacent and fetched together) or its whole lines at the streaming bandwidth,
        whichever is slower."""
        if row_bytes <= 0:
            return 0.0
        granules = math.ceil(row_bytes / LINE_BYTES)
        return max(self.access_time, granules * LINE_BYTES / self.bandwidth)


@dataclass(frozen=True)
class HardwareSpec:
    """A device as the cost model sees it.  ``gemm`` maps dtype -> [(FLOPs per call, FLOP/s)]
    points (sorted by size; one point = a peak); throughput for other sizes is interpolated
    log-linearly and clamped at the ends."""

    name: str
    kind: Literal["cpu", "gpu", "accelerator"]
    tiers: tuple[MemoryTier, ...]
    gemm: dict[str, tuple[tuple[float, float], ...]]
    call_overhead: float      # s per framework op / kernel launch
    cores: int
    threads: int = 0          # threads the numbers were taken with (0: the whole device)
    source: Source = "spec"
    notes: str = ""
    measurements: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.tiers or all(t.managed for t in self.tiers):
            raise RewriteError(f"hardware {self.name}: needs at least one memory tier that holds data")
        if "fp32" not in self.gemm:
            raise RewriteError(f"hardware {self.name}: gemm throughput needs an fp32 entry")

    @property
    def placeable(self) -> tuple[MemoryTier, ...]:
        return tuple(t for t in self.tiers if not t.managed)

    @property
    def caches(self) -> tuple[MemoryTier, ...]:
        return tuple(t for t in self.tiers if t.managed)

    def tier(self, name: str) -> MemoryTier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise RewriteError(f"hardware {self.name}: no memory tier {name!r} "
                           f"(tiers: {', '.join(t.name for t in self.tiers)})")

    def gemm_throughput(self, dtype: str, flops: float) -> float:
        """FLOP/s for one GEMM of ``flops`` FLOPs (falls back to fp32 for an unknown dtype)."""
        pts = self.gemm.get(dtype) or self.gemm["fp32"]
        if len(pts) == 1 or flops <= pts[0][0]:
            return pts[0][1]
        if flops >= pts[-1][0]:
            return pts[-1][1]
        for (f0, r0), (f1, r1) in zip(pts, pts[1:]):
            if f0 <= flops <= f1:
                w = (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
                return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))
        return pts[-1][1]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tiers"] = list(d["tiers"])
        d["gemm"] = {k: [list(p) for p in v] for k, v in self.gemm.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "hardware spec") -> "HardwareSpec":
        try:
            tiers = tuple(MemoryTier(**t) for t in d["tiers"])
            gemm = {str(k): tuple(sorted((float(a), float(b)) for a, b in v)) for k, v in d["gemm"].items()}
            known = {f.name for f in fields(cls)} - {"tiers", "gemm"}
            unknown = set(d) - known - {"tiers", "gemm"}
            if unknown:
                raise KeyError(f"unknown key(s) {', '.join(sorted(unknown))}")
            rest = {k: d[k] for k in known if k in d}
            spec = cls(tiers=tiers, gemm=gemm, **rest)
        except RewriteError as e:
            raise RewriteError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise RewriteError(f"{where}: not a hardware spec ({type(e).__name__}: {e}); "
                               f"see `rewrite hardware --json` for the format") from None
        for t in spec.tiers:
            if t.capacity <= 0 or t.bandwidth <= 0 or t.latency <= 0 or t.parallelism <= 0:
                raise RewriteError(f"{where}: tier {t.name}: capacity, bandwidth, latency and "
                                   f"parallelism must be positive")
        return spec


@dataclass(frozen=True)
class Variant:
    """One way to hold one table: a pass setting (None = leave the table as it is), placed in a
    tier, with the representation facts the estimators use and the measured quality."""

    table: str
    pass_spec: str | None          # "-p" text, e.g. "qr:collisions=4"; None keeps the table
    describe: str
    tier: str                      # placeable tier holding its bytes
    num_bytes: int
    facts: "RepFacts"
    rel_error: float = 0.0         # measured ||Δe||_F / ||e||_F on the sample
    auc_drop: float = 0.0          # measured AUC(original) - AUC(only this table rewritten), >= 0
    quality_source: Source = "measured"

    @property
    def key(self) -> str:
        return f"{self.table}|{self.pass_spec or 'keep'}|{self.tier}"


@dataclass(frozen=True)
class RepFacts:
    """What a representation costs per call, read off its own graph (``estimate.rep_facts``).

    gathers: per gather op (row bytes, bytes of the tensor gathered from, rows per lookup);
    flops: FLOPs per lookup (the representation's ``flops_per_lookup``) and the GEMM dtype;
    traffic: bytes written by its ops as (per lookup, per bag, per call); scatter: bytes its
    scatter ops (segment sums) read, same split; ops: kernels per call."""

    gathers: tuple[tuple[float, float, float], ...]
    flops_per_lookup: float
    gemm_dtype: str
    traffic: tuple[float, float, float]
    scatter: tuple[float, float, float]
    ops: int
    bytes_per_lookup: float
    source: str = "fx"             # "fx": traced; "contract": from the representation's counts only


@dataclass(frozen=True)
class Cost:
    """Seconds by term; ``total`` is their sum, ``+`` adds term by term (sources must agree)."""

    gather: float = 0.0
    compute: float = 0.0
    traffic: float = 0.0
    scatter: float = 0.0
    calls: float = 0.0
    source: Source = "estimated"

    TERMS = ("gather", "compute", "traffic", "scatter", "calls")

    @property
    def total(self) -> float:
        return sum(self.terms())

    def terms(self) -> tuple[float, ...]:
        return (self.gather, self.compute, self.traffic, self.scatter, self.calls)

    def __add__(self, other: "Cost") -> "Cost":
        src = self.source if self.source == other.source else "estimated"
        return Cost(*(a + b for a, b in zip(self.terms(), other.terms())), source=src)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.total, "source": self.source,
                **{f"{k}_s": v for k, v in zip(self.TERMS, self.terms())}}


@dataclass(frozen=True)
class Footprint:
    """Bytes per placeable tier."""

    bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def __add__(self, other: "Footprint") -> "Footprint":
        keys = set(self.bytes) | set(other.bytes)
        return Footprint({k: self.bytes.get(k, 0) + other.bytes.get(k, 0) for k in sorted(keys)})

    def fits_in(self, memory: "HardwareSpec | dict[str, int]") -> bool:
        """Every tier's bytes within its capacity (a dict: tier -> capacity bytes)."""
        caps = ({t.name: t.capacity for t in memory.placeable}
                if isinstance(memory, HardwareSpec) else dict(memory))
        return all(b <= caps.get(k, -1) for k, b in self.bytes.items() if b > 0)
