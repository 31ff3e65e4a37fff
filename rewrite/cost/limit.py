"""The host's limit for a path: the fewest seconds per batch its model could take on this machine.

    limit(B) = gather + compute
    gather   = Σ_tables the estimator's gather term (B·L lookups per feature, uniform ids: each
               table's share of every cache is its share of the lookups), each tier's random-row
               time the faster of ``index_select``'s and the fast engine's own gather
    compute  = Σ_tables B·L·flops_per_lookup / peak(table's dtype)
             + Σ_MLP layers B·2·K·N / peak(the path's MLP dtype) + the interaction's FLOPs / peak(fp32)

peak(dtype) is the highest rate ``rewrite hardware`` measured for that dtype on the kernels the
engine runs at this ISA tier (int8: its own int8 MLP kernel; bf16 only where the CPU computes in
bf16, otherwise the fp32 rate bounds it).  The stages of one call run one after another on the
bench's threads, so their times add; per-op, traffic and scatter terms are left out: they are the
software's cost, not the machine's.  ``rewrite bench`` prints limit / measured, the share of the
limit a path reaches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from torch import nn

from rewrite.core.model import RecModel
from rewrite.cost.estimate import Estimator, TableStats, dense_facts, rep_facts
from rewrite.cost.types import HardwareSpec, RepFacts


@dataclass(frozen=True)
class Limit:
    """Seconds per batch the host cannot beat, by stage."""

    gather_s: float
    compute_s: float

    @property
    def seconds(self) -> float:
        return self.gather_s + self.compute_s


@dataclass(frozen=True)
class ModelWork:
    """What a model asks of the machine per bag, read once and reused for every batch size."""

    tables: tuple[tuple[RepFacts, float], ...]  # (its facts, lookups per bag from this table at L = 1)
    mlp_flops: float                            # the bottom and top MLPs' Linear layers
    other_flops: float                          # the interaction's GEMMs (fp32 in every path)


def model_work(model: RecModel) -> ModelWork:
    uses = Counter(model.feature_tables)
    tables = tuple((rep_facts(model.embeddings[name]), float(n)) for name, n in uses.items())
    mlp = sum(2.0 * m.in_features * m.out_features for part in (model.bottom, model.top)
              for m in part.modules() if isinstance(m, nn.Linear))
    dense = sum(f for _, f in dense_facts(model).gemms)
    return ModelWork(tables, mlp, max(0.0, dense - mlp))


def mlp_dtype(precision: str, hw: HardwareSpec) -> str:
    """The arithmetic a path of ``precision`` runs its MLPs in, as a key of ``hw.gemm``."""
    if precision == "int8-dense" and "int8" in hw.gemm:
        return "int8"
    if precision == "bf16-dense" and "bf16" in hw.gemm:
        return "bf16"
    return "fp32"


def peak(hw: HardwareSpec, dtype: str) -> float:
    """The highest FLOP/s measured for ``dtype`` (fp32's where it was not measured)."""
    return max(rate for _, rate in hw.gemm.get(dtype) or hw.gemm["fp32"])


def fastest_gathers(hw: HardwareSpec) -> HardwareSpec:
    """``hw`` with each tier's random-row time the faster of ``index_select``'s and the fast
    engine's (``measurements["engine_tier_row_s"]``, where ``rewrite hardware`` measured it)."""
    engine = hw.measurements.get("engine_tier_row_s") or {}
    tiers = tuple(replace(t, latency=min(t.latency, engine[t.name] * t.parallelism)) if t.name in engine else t
                  for t in hw.tiers)
    return replace(hw, tiers=tiers)


def path_limit(work: ModelWork, hw: HardwareSpec, dtype: str, batch: int, lookups_per_bag: int = 1) -> Limit:
    """The limit of one call on ``batch`` bags of ``lookups_per_bag`` ids per feature."""
    est = Estimator(fastest_gathers(hw))
    placed = hw.placeable[0].name
    total = sum(n for _, n in work.tables)
    gather = compute = 0.0
    for facts, n in work.tables:
        stats = TableStats(lookups_per_bag=lookups_per_bag * n, cache_share=n / total)
        gather += float(est.terms_table(facts, placed, stats, batch)[0])
        compute += batch * lookups_per_bag * n * facts.flops_per_lookup / peak(hw, facts.gemm_dtype)
    compute += batch * (work.mlp_flops / peak(hw, dtype) + work.other_flops / peak(hw, "fp32"))
    return Limit(gather, compute)


def limit_fields(work: ModelWork, hw: HardwareSpec, precision: str, batch: int, measured_ms: float,
                 lookups_per_bag: int = 1) -> dict[str, float | str]:
    """A measured figure's limit, as the benchmarks report it: ``limit_ms`` (and its gather and
    compute parts), the ``mlp_dtype`` it assumed and ``of_limit`` = limit / measured."""
    dtype = mlp_dtype(precision, hw)
    limit = path_limit(work, hw, dtype, batch, lookups_per_bag)
    return {"limit_ms": limit.seconds * 1e3, "limit_gather_ms": limit.gather_s * 1e3,
            "limit_compute_ms": limit.compute_s * 1e3, "mlp_dtype": dtype,
            "of_limit": limit.seconds * 1e3 / measured_ms}
