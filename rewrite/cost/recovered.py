"""Planning with recovery (``rewrite plan --recover DATA``): measure the few best plans *after* recovery.

Per-table AUC drops are measured on the fitted tables, before recovery, which repairs much of
them: a plan the fitted-only estimate rejects may keep the AUC once recovered.  So:

    variants    every fitted variant, those beyond their per-table tolerance included (recovery
                repairs them; the tolerance is about the fitted table)
    candidates  the K plans (``candidates``, default 3) with the smallest summed per-table AUC
                drop (the estimate) that meet every limit except the AUC drop: solve with the
                objective Σ drop_j x_j, exclude that plan, solve again, ...
    measure     each recovered on DATA (``rewrite.recovery.recover`` at its defaults, seeded),
                its whole-plan AUC drop measured on the ``--data`` sample
    choose      among those within ``--max-auc-drop``, the lowest estimated latency at
                ``--batch``; none within it: a RewriteError naming the best one measured

The plan records the recipe (``recovery``: the data file and its sha256, the settings, every
candidate measured) and ``rewrite compile --plan`` recovers its primary path the same way.  It
has one path: extra dispatch paths would each need a recovery of their own.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewrite.artifact import sha256_file as sha256_of
from rewrite.core.batch import Batch
from rewrite.core.errors import RewriteError
from rewrite.core.metrics import auc
from rewrite.core.model import RecModel
from rewrite.cost.ilp import Constraints, Infeasible, Problem, solve
from rewrite.cost.select import Selected, diagnose
from rewrite.cost.types import Variant
from rewrite.cost.variants import Enumeration

DEFAULT_CANDIDATES = 3


@dataclass(frozen=True)
class RecoverySettings:
    data: Path                    # what recovery trains on (kept apart from --data)
    candidates: int = DEFAULT_CANDIDATES
    train_top: bool = False
    seed: int = 0

    def to_json(self, sha256: str | None = None) -> dict[str, Any]:
        return {"data": str(self.data), "sha256": sha256, "candidates": self.candidates,
                "train_top": self.train_top, "seed": self.seed}


def recover_model(original: RecModel, rewritten: RecModel, recipe: dict[str, Any]) -> RecModel:
    """Recover ``rewritten`` as a plan's ``recovery`` recipe says (``rewrite compile --plan``)."""
    from rewrite import data
    from rewrite.recovery import recover

    path = Path(recipe["data"])
    if not path.exists():
        raise RewriteError(f"{path}: the plan's recovery data are missing (the plan was made with "
                           f"--recover {path})")
    if recipe.get("sha256") and sha256_of(path) != recipe["sha256"]:
        raise RewriteError(f"{path}: differs from the recovery data the plan was measured with "
                           f"(sha256 mismatch)")
    model, _ = recover(original, rewritten, data.open(path), train_top=bool(recipe.get("train_top")),
                       seed=int(recipe.get("seed", 0)))
    return model


def recovered_measure(model: RecModel, enum: Enumeration, sample: list[Batch], settings: RecoverySettings):
    """choice -> (whole-plan AUC drop on ``sample`` after recovery, the recovery report JSON)."""
    from rewrite import data
    from rewrite.recovery import recover

    train = data.open(settings.data)
    data.check_matches(train, model.spec.n_dense, len(model.spec.features))
    y = np.concatenate([b.labels.numpy() for b in sample])
    memo: dict[frozenset, tuple[float, dict]] = {}

    def measure(choice: dict[str, Variant]) -> tuple[float, dict]:
        key = frozenset(v.key for v in choice.values())
        if key not in memo:
            tables = {t: enum.reps[v.key] for t, v in choice.items() if v.pass_spec is not None}
            rewritten = model.with_tables(tables) if tables else model
            rec, report = recover(model, rewritten, train, train_top=settings.train_top, seed=settings.seed)
            with torch.no_grad():
                z = np.concatenate([rec.eval()(*b.inputs()).numpy() for b in sample])
            memo[key] = (enum.auc_base - auc(y, z), report.to_json())
        return memo[key]

    return measure


def select_recovered(p: Problem, c: Constraints, batch: int, measure, candidates: int) -> Selected:
    """The module docstring's loop; ``revisions`` lists every candidate measured."""
    if candidates < 1:
        raise RewriteError(f"--recover-candidates must be >= 1, got {candidates}")
    relaxed = dataclasses.replace(c, max_auc_drop=None)
    tried, found, excluded, seen = [], [], [], set()
    while len(found) < candidates:
        try:
            sol = solve(p, relaxed, batch, objective="auc", exclude=excluded)
        except Infeasible:
            if not found:
                raise RewriteError(diagnose(p, relaxed, batch)) from None
            break
        excluded.append(sol.choice)
        passes = frozenset((t, v.pass_spec) for t, v in sol.choice.items())
        if passes in seen:               # the same representations in another memory tier
            continue
        seen.add(passes)
        t0 = time.perf_counter()
        drop, report = measure(sol.choice)
        found.append(sol)
        tried.append({"plan": {t: v.pass_spec for t, v in sol.choice.items()},
                      "bytes": p.footprint(sol.choice).total,
                      "latency_s": p.plan_cost(sol.choice, batch).total,
                      "auc_drop_estimated": sum(v.auc_drop for v in sol.choice.values()),
                      "auc_drop_recovered": drop, "recovery_steps": report["steps"],
                      "recovery_best_step": report["best_step"], "seconds": time.perf_counter() - t0})
    ok = [i for i, t in enumerate(tried) if c.max_auc_drop is None or t["auc_drop_recovered"] <= c.max_auc_drop]
    if not ok:
        best = min(tried, key=lambda t: t["auc_drop_recovered"])
        raise RewriteError(f"no plan meets --max-auc-drop {c.max_auc_drop:g} after recovery: {len(tried)} "
                           f"candidate(s) recovered and measured, the best dropped AUC by "
                           f"{best['auc_drop_recovered']:.4g} ({best['bytes']:,} bytes); raise the memory "
                           f"budget, --max-auc-drop or --recover-candidates")
    pick = min(ok, key=lambda i: tried[i]["latency_s"])
    for i, t in enumerate(tried):
        t["chosen"] = i == pick
    return Selected(found[pick], relaxed, tried[pick]["auc_drop_recovered"], tried)
