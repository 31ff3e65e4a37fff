"""The exact selection: one variant per table, as a 0/1 integer program (``scipy.optimize.milp``).

Variables x_j ∈ {0, 1}, one per variant j of table t(j).  With lat_j(B) the variant's estimated
seconds at batch B, bytes_j its bytes in tier(j), drop_j its measured AUC drop:

    minimise   Σ_j lat_j(B_ref) x_j  (+ 1e-3 · mean lat · bytes_j / Σ_t max bytes: a tie-break)
    subject to Σ_{j ∈ t} x_j = 1                              every table, one variant
               Σ_{j: tier(j)=k} bytes_j x_j <= cap_k - dense_k  every placeable tier k
               Σ_j bytes_j x_j <= budget - dense_bytes          --memory-budget
               Σ_j drop_j x_j <= max_auc_drop                   AUC drops summed: an estimate,
                                                                 checked by measuring (select.py)
               Σ_j lat_j(B_t) x_j <= T - dense(B_t)              --latency-target T@B_t
               Σ_{j ∈ P} x_j <= |P| - 1                          every excluded plan P

``objective`` can instead minimise bytes or the summed AUC drop (used by the infeasibility
diagnosis and the Pareto sweep).  ``brute_force`` solves the same problem by enumeration (tests).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from rewrite.cost.estimate import DenseFacts, Estimator, TableStats
from rewrite.cost.types import Cost, Footprint, Variant

TIE_BREAK = 1e-3


@dataclass(frozen=True)
class Constraints:
    memory_budget: int | None = None           # bytes, whole model (tables + MLPs)
    max_auc_drop: float | None = None          # summed per-table measured AUC drops
    latency_target: tuple[float, int] | None = None   # (seconds, batch size)
    memory_budget_text: str | None = field(default=None, compare=False)   # as the user wrote it

    def budget_text(self, value: int | float | None = None) -> str:
        """``value`` (default: the memory budget) in the unit the user wrote the budget in, and in
        exact bytes: '100KB (100,000 bytes)'."""
        from rewrite.core.units import bytes_like

        return bytes_like(self.memory_budget if value is None else value, self.memory_budget_text)


@dataclass
class Problem:
    """Everything the solver needs; latencies are computed once per batch size and cached."""

    variants: dict[str, list[Variant]]
    estimator: Estimator
    stats: dict[str, TableStats]
    dense: DenseFacts
    dense_bytes: int
    _lat: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def tables(self) -> list[str]:
        return list(self.variants)

    @property
    def flat(self) -> list[Variant]:
        return [v for t in self.tables for v in self.variants[t]]

    @property
    def dense_tier(self) -> str:
        return self.estimator.hw.placeable[0].name      # MLP weights: the fastest placeable tier

    def variant_cost(self, v: Variant, batch: int) -> Cost:
        return self.estimator.table_cost(v.facts, v.tier, self.stats[v.table], batch)

    def latencies(self, batch: int) -> np.ndarray:
        if batch not in self._lat:
            self._lat[batch] = np.array([self.variant_cost(v, batch).total for v in self.flat])
        return self._lat[batch]

    def dense_cost(self, batch: int) -> Cost:
        return self.estimator.dense_cost(self.dense, batch)

    def plan_cost(self, choice: dict[str, Variant], batch: int) -> Cost:
        total = self.dense_cost(batch)
        for v in choice.values():
            total = total + self.variant_cost(v, batch)
        return total

    def footprint(self, choice: dict[str, Variant]) -> Footprint:
        fp = Footprint({self.dense_tier: self.dense_bytes})
        for v in choice.values():
            fp = fp + Footprint({v.tier: v.num_bytes})
        return fp

    def violations(self, choice: dict[str, Variant], c: Constraints) -> list[str]:
        """Which constraints ``choice`` breaks, by name (empty: feasible)."""
        out = []
        fp = self.footprint(choice)
        for tier in self.estimator.hw.placeable:
            if fp.bytes.get(tier.name, 0) > tier.capacity:
                out.append(f"{tier.name} capacity")
        if c.memory_budget is not None and fp.total > c.memory_budget:
            out.append("memory budget")
        if c.max_auc_drop is not None and sum(v.auc_drop for v in choice.values()) > c.max_auc_drop + 1e-12:
            out.append("AUC drop")
        if c.latency_target is not None:
            seconds, batch = c.latency_target
            if self.plan_cost(choice, batch).total > seconds:
                out.append("latency target")
        return out


@dataclass(frozen=True)
class Solution:
    choice: dict[str, Variant]
    objective: float


class Infeasible(Exception):
    pass


def _objective_vector(p: Problem, objective: str, batch: int) -> np.ndarray:
    flat = p.flat
    nbytes = np.array([v.num_bytes for v in flat], dtype=np.float64)
    keep_bytes = max(1.0, sum(max(v.num_bytes for v in vs) for vs in p.variants.values()))
    if objective == "latency":
        return p.latencies(batch) + TIE_BREAK * nbytes / keep_bytes * max(1e-12, p.latencies(batch).mean())
    if objective == "memory":
        return nbytes / keep_bytes
    if objective == "auc":
        return np.array([v.auc_drop for v in flat]) + TIE_BREAK * nbytes / keep_bytes * 1e-6
    raise ValueError(f"unknown objective {objective!r}")


def solve(p: Problem, c: Constraints, batch: int, objective: str = "latency",
          exclude: list[dict[str, Variant]] = (), fixed_out: tuple[Variant, ...] = ()) -> Solution:
    """The optimal plan, or ``Infeasible``.  ``fixed_out``: variants forced to 0 (runner-ups)."""
    flat, tables = p.flat, p.tables
    index = {id(v): j for j, v in enumerate(flat)}
    rows, lo, hi = [], [], []

    def add(coeffs, lb, ub):
        rows.append(coeffs)
        lo.append(lb)
        hi.append(ub)

    for t in tables:
        add([1.0 if v.table == t else 0.0 for v in flat], 1.0, 1.0)
    nbytes = np.array([v.num_bytes for v in flat], dtype=np.float64)
    for tier in p.estimator.hw.placeable:
        dense = p.dense_bytes if tier.name == p.dense_tier else 0
        add(np.where([v.tier == tier.name for v in flat], nbytes, 0.0), -np.inf, tier.capacity - dense)
    if c.memory_budget is not None:
        add(nbytes, -np.inf, c.memory_budget - p.dense_bytes)
    if c.max_auc_drop is not None:
        add([v.auc_drop for v in flat], -np.inf, c.max_auc_drop)
    if c.latency_target is not None:
        seconds, tb = c.latency_target
        add(p.latencies(tb), -np.inf, seconds - p.dense_cost(tb).total)
    for plan in exclude:
        add([1.0 if any(v is w for w in plan.values()) else 0.0 for v in flat], -np.inf, len(plan) - 1)
    upper = np.ones(len(flat))
    for v in fixed_out:
        upper[index[id(v)]] = 0.0
    res = milp(_objective_vector(p, objective, batch), integrality=np.ones(len(flat)),
               bounds=Bounds(np.zeros(len(flat)), upper),
               constraints=LinearConstraint(np.array(rows, dtype=np.float64), lo, hi))
    if res.status != 0 or res.x is None:
        raise Infeasible(res.message)
    choice = {flat[j].table: flat[j] for j in np.flatnonzero(res.x > 0.5)}
    return Solution(choice, float(res.fun))


def brute_force(p: Problem, c: Constraints, batch: int, objective: str = "latency") -> Solution:
    """Exhaustive search over every combination (small problems; the tests' reference)."""
    obj = dict(zip(map(id, p.flat), _objective_vector(p, objective, batch)))
    best = None
    for combo in itertools.product(*(p.variants[t] for t in p.tables)):
        choice = dict(zip(p.tables, combo))
        if p.violations(choice, c):
            continue
        value = sum(obj[id(v)] for v in combo)
        if best is None or value < best.objective - 1e-15:
            best = Solution(choice, float(value))
    if best is None:
        raise Infeasible("no combination satisfies the constraints")
    return best
