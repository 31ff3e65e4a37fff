"""Selection: solve, measure the chosen plan's AUC as a whole, revise; diagnose; explain.

AUC changes do not add across tables, so the solver's summed per-table drops are only an
estimate.  The loop:

    q = max_auc_drop
    repeat:  plan = solve(constraints with Σ drop <= q, excluding every plan already rejected)
             D = measured AUC drop of the whole plan on the sample
             if D <= max_auc_drop: done
             reject plan;  q = min(q, Σ drop(plan)) · max_auc_drop / D · 0.9     (tighten)

until ``MAX_REVISIONS``; then a ``RewriteError`` naming the best plan measured.  When nothing fits
at all, ``diagnose`` says which constraint cannot be met given the others, and by how much.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from rewrite.cost.ilp import Constraints, Infeasible, Problem, Solution, solve
from rewrite.cost.types import Variant
from rewrite.core.errors import RewriteError
from rewrite.inspection import human_bytes

MAX_REVISIONS = 5
SAFETY = 0.9          # tighten a little beyond the observed measured/estimated ratio
Measure = Callable[[dict[str, Variant]], float]


@dataclass
class Selected:
    solution: Solution
    constraints: Constraints                  # as finally solved (tightened quality budget)
    measured_auc_drop: float | None = None
    revisions: list[dict] = field(default_factory=list)


def select(p: Problem, c: Constraints, batch: int, measure: Measure | None = None) -> Selected:
    """The plan minimising latency at ``batch`` under ``c``; AUC checked by ``measure``."""
    q, rejected, history = c.max_auc_drop, [], []
    for attempt in range(MAX_REVISIONS + 1):
        cq = dataclasses.replace(c, max_auc_drop=q)
        try:
            sol = solve(p, cq, batch, exclude=rejected)
        except Infeasible:
            if attempt == 0:
                raise RewriteError(diagnose(p, c, batch)) from None
            break
        measured = measure(sol.choice) if measure is not None else None
        estimated = sum(v.auc_drop for v in sol.choice.values())
        if measured is None or c.max_auc_drop is None or measured <= c.max_auc_drop:
            return Selected(sol, cq, measured, history)
        history.append({"quality_budget": q, "auc_drop_estimated": estimated,
                        "auc_drop_measured": measured,
                        "plan": {t: v.pass_spec for t, v in sol.choice.items()}})
        rejected.append(sol.choice)
        q = min(q, estimated) * c.max_auc_drop / measured * SAFETY
    best = min(history, key=lambda h: h["auc_drop_measured"])
    raise RewriteError(f"no plan meets --max-auc-drop {c.max_auc_drop:g} measured as a whole: "
                       f"{len(history)} plan(s) measured, the best dropped AUC by "
                       f"{best['auc_drop_measured']:.4g} (per-table sum {best['auc_drop_estimated']:.4g}); "
                       f"raise the budget or the other limits")


def _quantity(p: Problem, choice: dict[str, Variant], name: str, c: Constraints) -> float:
    if name == "memory budget":
        return p.footprint(choice).total
    if name == "AUC drop":
        return sum(v.auc_drop for v in choice.values())
    return p.plan_cost(choice, c.latency_target[1]).total


def _human(name: str, value: float, c: Constraints) -> str:
    if name == "memory budget":
        return c.budget_text(value)
    if name == "AUC drop":
        return f"{value:.4g}"
    return f"{value * 1e3:.3g} ms"


def diagnose(p: Problem, c: Constraints, batch: int) -> str:
    """One line: which constraint cannot be met given the others, and the best achievable."""
    hw = p.estimator.hw
    smallest = p.dense_bytes + sum(min(v.num_bytes for v in vs) for vs in p.variants.values())
    room = sum(t.capacity for t in hw.placeable)
    if smallest > room:
        tiers = ", ".join(f"{t.name} {human_bytes(t.capacity)}" for t in hw.placeable)
        return (f"no plan fits: the smallest plan needs {human_bytes(smallest)}; {hw.name} holds "
                f"{human_bytes(room)} ({tiers})")
    checks = [("memory budget", "memory", "--memory-budget", c.memory_budget, "memory_budget"),
              ("AUC drop", "auc", "--max-auc-drop", c.max_auc_drop, "max_auc_drop"),
              ("latency target", "latency", "--latency-target",
               c.latency_target[0] if c.latency_target else None, "latency_target")]
    parts = []
    for name, objective, flag, bound, attr in checks:
        if bound is None:
            continue
        others = dataclasses.replace(c, **{attr: None})
        at = c.latency_target[1] if name == "latency target" else batch
        try:
            best = solve(p, others, at, objective=objective).choice
        except Infeasible:
            continue
        value = _quantity(p, best, name, c)
        if value > bound:
            parts.append(f"{flag} {_human(name, bound, c)} cannot be met: the best plan within the "
                         f"other limits needs {_human(name, value, c)}")
    return "no plan fits: " + ("; ".join(parts) if parts else "the limits conflict only jointly; "
                               "relax any one of them")


def explain(p: Problem, sel: Selected, batch: int) -> list[dict]:
    """Per table: the choice, the runner-up (best plan without that choice) and the constraint
    that keeps the table from its next faster variant."""
    from rewrite.cost.variants import spelled

    choice, c = sel.solution.choice, sel.constraints
    lat = {v.key: p.variant_cost(v, batch).total for v in p.flat}
    rows = []
    for t in p.tables:
        chosen, runner = choice[t], None
        if len(p.variants[t]) > 1:
            try:
                ru = solve(p, c, batch, fixed_out=(chosen,))
                runner = {"pass": ru.choice[t].pass_spec or "keep", "tier": ru.choice[t].tier,
                          "objective_increase_s": ru.objective - sel.solution.objective}
            except Infeasible:
                runner = {"pass": None, "reason": "no other variant of this table fits the limits"}
        faster = sorted((v for v in p.variants[t] if lat[v.key] < lat[chosen.key] * (1 - 1e-9)),
                        key=lambda v: lat[v.key])
        if not faster:
            binding = "none: the fastest variant of this table"
        else:
            broken = p.violations({**choice, t: faster[0]}, c)
            named = [f"memory budget {c.budget_text()}" if b == "memory budget" else b for b in broken]
            binding = (", ".join(named) + f" (the faster {spelled(faster[0].pass_spec)} would break it)"
                       if broken else "a whole-plan AUC measurement rejected the faster plan")
        rows.append({"table": t, "choice": chosen.pass_spec or "keep", "describe": chosen.describe,
                     "tier": chosen.tier, "bytes": chosen.num_bytes,
                     "latency_s": {"value": lat[chosen.key], "source": p.estimator.source},
                     "auc_drop": {"value": chosen.auc_drop, "source": chosen.quality_source},
                     "runner_up": runner, "binding": binding})
    return rows
