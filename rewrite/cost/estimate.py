"""Estimators: bytes per tier and seconds per batch for a table variant and for the dense part.

Before: a representation (or the model's MLPs) and a hardware spec.  After: a ``Cost`` in four
terms for a batch of B bags with L lookups each (n = B·L lookups):

    gather  = Σ_g n·r_g · Σ_tiers served_tier · row_time_tier(row_bytes_g)
    compute = n · flops_per_lookup / gemm_throughput(dtype, n · flops_per_lookup)
    traffic = (a·n + b·B + c) / bandwidth of the fastest tier          (bytes its ops write)
    scatter = (a'·n + b'·B + c') / bandwidth of the fastest tier       (bytes segment sums read)
    calls   = ops · call_overhead

and latency = θ · terms, θ = (1, 1, 1, 1, 1) uncalibrated, or fitted on this machine
(``calibrate``).  The representation's facts are read off its own graph: every ``index_select``
/ ``embedding`` of a parameter is a gather (r_g rows of row_bytes_g per lookup from a tensor of
S_g bytes); ``flops_per_lookup`` is the representation's own count; traffic and the op count come
from shape propagation on a probe of n0 lookups in B0 bags.

Hot rows hit in cache (FAE): a table gets a share of each hardware cache proportional to its share
of all lookups; a cache of C bytes holds the top f = min(1, share·C / S_g) of the gathered tensor,
which serves coverage(f) of the lookups (coverage from the access profile, uniform without one);
each cache level serves what the faster ones did not, the tier holding the bytes the rest.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from rewrite.cost.types import Cost, HardwareSpec, RepFacts, Source
from rewrite.core.embedding import Representation
from rewrite.core.model import RecModel

PROBE_LOOKUPS, PROBE_BAGS = 97, 13      # probe shapes: distinct primes, so a dim tells n from B
SCATTER_TARGETS = {"scatter_add", "scatter_add_", torch.scatter_add, "index_add", "index_add_",
                   torch.index_add, "scatter_reduce", torch.scatter_reduce}
GATHER_TARGETS = {"index_select", torch.index_select, torch.nn.functional.embedding, torch.embedding}
NOT_KERNELS = {getattr, operator.getitem}   # python-level attribute / item access on proxies
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.int8: "int8", torch.int32: "int8"}
Coverage = Callable[[float], float]


def uniform(f: float) -> float:
    return min(1.0, max(0.0, f))


def coverage_curve(counts: np.ndarray | None) -> Coverage:
    """cov(f): share of lookups that go to the most-accessed fraction f of rows."""
    if counts is None or counts.sum() == 0:
        return uniform
    c = np.cumsum(np.sort(np.asarray(counts, dtype=np.float64))[::-1])
    c /= c[-1]
    rows = len(c)

    def cov(f: float) -> float:
        k = int(min(rows, max(0.0, f) * rows))
        return float(c[k - 1]) if k > 0 else 0.0

    return cov


@dataclass(frozen=True)
class TableStats:
    """What the estimators need to know about a table's traffic."""

    lookups_per_bag: float = 1.0     # L, pooling factor
    cache_share: float = 1.0         # its share of each hardware cache (share of all lookups)
    coverage: Coverage = uniform


def _kernel_nodes(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and node.target not in NOT_KERNELS:
            yield node
        elif node.target is operator.getitem and "tensor_meta" in node.meta and \
                hasattr(node.meta["tensor_meta"], "shape"):
            yield node          # tensor slicing is a (view) op too


def _out_bytes(node: fx.Node) -> tuple[tuple[int, ...], float]:
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return (), 0.0
    shape = tuple(tm.shape)
    return shape, float(np.prod(shape, dtype=np.float64)) * torch.empty((), dtype=tm.dtype).element_size()


def rep_facts(rep: Representation) -> RepFacts:
    """Trace ``rep`` and read its gathers, traffic and ops off the graph (``contract`` fallback
    when it cannot be traced: one gather of ``bytes_per_lookup`` from all its bytes)."""
    n0, b0 = PROBE_LOOKUPS, PROBE_BAGS
    try:
        gm = fx.symbolic_trace(rep)
        idx = torch.arange(n0, dtype=torch.int64) % rep.rows
        off = torch.linspace(0, n0, b0 + 1).round().to(torch.int64)
        with torch.no_grad():
            ShapeProp(gm).propagate(idx, off)
    except Exception:  # noqa: BLE001  (any representation fx cannot trace gets the fallback)
        return contract_facts(rep)
    gathers, traffic, scatter, ops, dtype = [], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 0, "fp32"
    for node in _kernel_nodes(gm):
        ops += 1
        shape, nbytes = _out_bytes(node)
        if node.target in GATHER_TARGETS:
            src = node.args[0] if node.target in ("index_select", torch.index_select) else node.args[1]
            if isinstance(src, fx.Node) and src.op == "get_attr":
                w = getattr(gm, src.target) if hasattr(gm, src.target) else gm.get_parameter(src.target)
                row = float(np.prod(w.shape[1:], dtype=np.float64)) * w.element_size()
                gathers.append((row, float(w.numel() * w.element_size()), nbytes / row / n0))
        if node.target in (torch.matmul, operator.matmul, "matmul", torch.mm, torch.bmm) and shape:
            dtype = DTYPE_NAMES.get(node.meta["tensor_meta"].dtype, "fp32")
        _split(traffic, shape, nbytes)
        if node.target in SCATTER_TARGETS:
            src = node.args[3] if len(node.args) > 3 else node.kwargs.get("src", node.args[-1])
            if isinstance(src, fx.Node):
                _split(scatter, *_out_bytes(src))
    return RepFacts(tuple(gathers), float(rep.flops_per_lookup()), dtype, tuple(traffic),
                    tuple(scatter), ops, float(rep.bytes_per_lookup()), "fx")


def _split(acc: list[float], shape: tuple[int, ...], nbytes: float) -> None:
    """Add bytes to (per lookup, per bag, per call) by the leading dim of the probe's shape."""
    lead = shape[0] if shape else 0
    if abs(lead - PROBE_LOOKUPS) <= 1:
        acc[0] += nbytes / PROBE_LOOKUPS
    elif abs(lead - PROBE_BAGS) <= 1:
        acc[1] += nbytes / PROBE_BAGS
    else:
        acc[2] += nbytes


def contract_facts(rep: Representation) -> RepFacts:
    bpl = float(rep.bytes_per_lookup())
    return RepFacts(((bpl, float(rep.num_bytes()), 1.0),), float(rep.flops_per_lookup()), "fp32",
                    (2 * bpl, 4.0 * rep.dim, 0.0), (4.0 * rep.dim, 0.0, 0.0), 12, bpl, "contract")


@dataclass(frozen=True)
class DenseFacts:
    """The MLPs and the interaction: per bag, GEMM FLOPs by (dtype, FLOPs per bag of one GEMM),
    bytes written; and the op count per call."""

    gemms: tuple[tuple[str, float], ...]
    traffic_per_bag: float
    ops: int


def dense_facts(model: RecModel) -> DenseFacts:
    """Shape-propagate the captured model on a probe batch; everything but the tables."""
    from rewrite.core.synthetic import multi_hot_batch
    from rewrite.core.tracing import capture

    gm, _ = capture(model)
    b0 = PROBE_BAGS
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    batch = multi_hot_batch(rows, b0, model.spec.n_dense, mean_len=1.0, seed=0)
    with torch.no_grad():
        ShapeProp(gm).propagate(*batch.inputs())
    gemms, traffic, ops = [], 0.0, 0
    for node in _kernel_nodes(gm):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Representation):
            continue
        ops += 2 * len(model.spec.features) + 2 if getattr(node.target, "__name__", "") == "split_bags" else 1
        shape, nbytes = _out_bytes(node)
        traffic += nbytes / b0
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Linear):
            lin = gm.get_submodule(node.target)
            gemms.append((DTYPE_NAMES.get(lin.weight.dtype, "fp32"), 2.0 * lin.in_features * lin.out_features))
        elif node.target in (torch.bmm, torch.matmul, operator.matmul) and shape:
            a = node.args[0].meta["tensor_meta"].shape
            gemms.append(("fp32", 2.0 * float(np.prod(a, dtype=np.float64)) * shape[-1] / b0))
    return DenseFacts(tuple(gemms), traffic, ops)


@dataclass(frozen=True)
class Estimator:
    """The latency model for one hardware spec (and, calibrated, one target)."""

    hw: HardwareSpec
    theta: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    source: Source = "estimated"

    def served(self, placed: str, source_bytes: float, stats: TableStats) -> list[tuple[str, float]]:
        """(tier, share of accesses) for rows gathered from a tensor of ``source_bytes`` placed in
        tier ``placed``: caches above it serve the hot rows, ``placed`` the rest."""
        out, covered = [], 0.0
        for tier in self.hw.tiers:
            if tier.name == placed:
                out.append((tier.name, 1.0 - covered))
                return out
            if tier.managed:
                f = 1.0 if source_bytes <= 0 else stats.cache_share * tier.capacity / source_bytes
                cov = max(covered, stats.coverage(min(1.0, f)))
                out.append((tier.name, cov - covered))
                covered = cov
        raise ValueError(f"tier {placed!r} not in hardware {self.hw.name}")

    def terms_table(self, facts: RepFacts, placed: str, stats: TableStats, batch: int) -> np.ndarray:
        """The five uncalibrated terms (seconds) for one table at ``batch`` bags."""
        n = batch * stats.lookups_per_bag
        gather = 0.0
        for row_bytes, source_bytes, rows_per_lookup in facts.gathers:
            per_row = sum(share * self.hw.tier(t).row_time(row_bytes)
                          for t, share in self.served(placed, source_bytes, stats))
            gather += n * rows_per_lookup * per_row
        flops = n * facts.flops_per_lookup
        compute = flops / self.hw.gemm_throughput(facts.gemm_dtype, flops) if flops > 0 else 0.0
        bw = self.hw.tiers[0].bandwidth
        traffic = float(np.dot(facts.traffic, (n, batch, 1.0))) / bw
        scatter = float(np.dot(facts.scatter, (n, batch, 1.0))) / bw
        return np.array([gather, compute, traffic, scatter, facts.ops * self.hw.call_overhead])

    def terms_dense(self, facts: DenseFacts, batch: int) -> np.ndarray:
        compute = sum(batch * f / self.hw.gemm_throughput(dt, batch * f) for dt, f in facts.gemms)
        traffic = batch * facts.traffic_per_bag / self.hw.tiers[0].bandwidth
        return np.array([0.0, compute, traffic, 0.0, facts.ops * self.hw.call_overhead])

    def cost(self, terms: Sequence[float]) -> Cost:
        return Cost(*(float(t) * th for t, th in zip(terms, self.theta)), source=self.source)

    def table_cost(self, facts: RepFacts, placed: str, stats: TableStats, batch: int) -> Cost:
        return self.cost(self.terms_table(facts, placed, stats, batch))

    def dense_cost(self, facts: DenseFacts, batch: int) -> Cost:
        return self.cost(self.terms_dense(facts, batch))
