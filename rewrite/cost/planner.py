"""The planning loop, short: enumerate -> estimate -> select (measure, revise) -> dispatch -> report.

Before: a model, sample data (labelled or not), an access profile, a hardware spec with its
estimator, constraints.  After: a ``plan/1`` dict (see ``plan_file.py``) and the problem it was solved
on (for ``--explain`` and the Pareto frontier).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rewrite.core.batch import Batch
from rewrite.cost.dispatch import LADDER, design_dispatch
from rewrite.cost.estimate import Estimator, dense_facts
from rewrite.cost.plan_file import PLAN_SCHEMA
from rewrite.cost.select import Selected, select
from rewrite.cost.ilp import Constraints, Problem
from rewrite.cost.types import Variant
from rewrite.cost.variants import Enumeration, enumerate_variants, restrict, table_stats
from rewrite.core.errors import RewriteError
from rewrite.core.metrics import auc
from rewrite.core.model import RecModel
from rewrite.core.access_profile import AccessProfile


def make_measure(model: RecModel, enum: Enumeration, sample: list[Batch]):
    """choice -> measured AUC drop of the whole plan on the sample (memoised)."""
    y = np.concatenate([b.labels.numpy() for b in sample])
    memo: dict[frozenset, float] = {}

    def measure(choice: dict[str, Variant]) -> float:
        key = frozenset(v.key for v in choice.values())
        if key not in memo:
            tables = {t: enum.reps[v.key] for t, v in choice.items() if v.pass_spec is not None}
            m = model.with_tables(tables) if tables else model
            import torch

            with torch.no_grad():
                z = np.concatenate([m(*b.inputs()).numpy() for b in sample])
            memo[key] = enum.auc_base - auc(y, z)
        return memo[key]

    return measure


def build_problem(model: RecModel, estimator: Estimator, sample: list[Batch],
                  profile: AccessProfile | None, grid=None, max_rel_error: float | None = None,
                  progress: bool = True, keep_degraded: bool = False) -> tuple[Problem, Enumeration]:
    enum = restrict(enumerate_variants(model, estimator.hw, sample, profile, grid, progress, keep_degraded),
                    max_rel_error)
    stats = table_stats(model, profile, sample)
    return Problem(enum.variants, estimator, stats, dense_facts(model), model.dense_bytes()), enum


def _num(value: float, source: str) -> dict[str, Any]:
    return {"value": value, "source": source}


def _path_json(p: Problem, choice: dict[str, Variant], batch: int, drop: float | None,
               labelled: bool) -> dict[str, Any]:
    src = p.estimator.source
    tables = {t: {"pass": v.pass_spec, "describe": v.describe, "tier": v.tier,
                  "bytes": _num(v.num_bytes, "counted"),
                  "rel_error": _num(v.rel_error, "measured"),
                  "auc_drop": _num(v.auc_drop, v.quality_source),
                  "latency_s": _num(p.variant_cost(v, batch).total, src)}
              for t, v in choice.items()}
    sizes = sorted({batch, *LADDER})
    return {"tables": tables, "bytes": _num(p.footprint(choice).total, "counted"),
            "bytes_by_tier": p.footprint(choice).bytes,
            "latency_s": {str(b): _num(p.plan_cost(choice, b).total, src) for b in sizes},
            "latency_terms_s": p.plan_cost(choice, batch).to_json(),
            "auc_drop": _num(drop, "measured") if drop is not None
            else _num(sum(v.auc_drop for v in choice.values()), "estimated" if labelled else "unmeasured")}


def make_plan(model: RecModel, model_path: str, problem: Problem, enum: Enumeration,
              constraints: Constraints, batch: int, target: str,
              sample: list[Batch], recovery=None) -> tuple[dict[str, Any], Selected]:
    """Select, measure, revise, add the dispatch policy; return the plan JSON.

    ``recovery`` (``rewrite.cost.recovered.RecoverySettings``): candidates are measured after
    recovery instead (``recovered.py``) and the plan has one path.
    """
    if (constraints.max_auc_drop is not None or recovery is not None) and not enum.labelled:
        raise RewriteError("--max-auc-drop and --recover need labelled data: --data has no y column "
                           "(use --max-rel-error to bound the per-table embedding error instead)")
    if recovery is not None:
        from rewrite.cost.recovered import recovered_measure, select_recovered

        measure_r = recovered_measure(model, enum, sample, recovery)
        sel = select_recovered(problem, constraints, batch, measure_r, recovery.candidates)
        # one path: every extra dispatch path is rejected (it would need a recovery of its own)
        paths, policy = design_dispatch(problem, sel, 0.0, lambda choice: float("inf"))
    else:
        measure = make_measure(model, enum, sample) if enum.labelled else None
        sel = select(problem, constraints, batch, measure)
        paths, policy = design_dispatch(problem, sel, constraints.max_auc_drop, measure)
    hw = problem.estimator.hw
    lt = constraints.latency_target
    plan = {
        "schema": PLAN_SCHEMA,
        "model": {"path": model_path, "tables": {t: {"rows": r.rows, "dim": r.dim, "representation": r.kind}
                                                 for t, r in model.embeddings.items()}},
        "hardware": {"name": hw.name, "kind": hw.kind, "source": hw.source, "notes": hw.notes},
        "target": target, "batch": batch, "estimator": {"source": problem.estimator.source,
                                                        "theta": list(problem.estimator.theta)},
        "constraints": {"memory_budget_bytes": constraints.memory_budget,
                        "max_auc_drop": constraints.max_auc_drop,
                        "latency_target": {"seconds": lt[0], "batch": lt[1]} if lt else None,
                        "quality_budget_solved": sel.constraints.max_auc_drop},
        "quality": {"auc_before": enum.auc_base, "labelled": enum.labelled,
                    "samples": sum(b.size for b in sample)},
        "primary": "p0",
        "paths": {name: _path_json(problem, choice, batch, policy["auc_drop_measured"].get(name),
                                   enum.labelled)
                  for name, choice in paths.items()},
        "dispatch": policy,
        "revisions": [] if recovery is not None else sel.revisions,
        "skipped": enum.skipped,
    }
    if recovery is not None:
        from rewrite.cost.recovered import sha256_of

        plan["recovery"] = {**recovery.to_json(sha256_of(recovery.data)), "candidates_measured": sel.revisions}
        plan["paths"]["p0"]["auc_drop"]["source"] = "measured after recovery"
    return plan, sel
