"""The Pareto frontier: memory vs latency vs AUC change, over the plans the solver can reach.

Sweep a grid of memory budgets (geometric, from the smallest plan to all tables kept) times
quality budgets (0, q/4, q/2, q, 2q, none; q = --max-auc-drop or the largest single-variant drop),
solve for the lowest latency at each, and keep the plans no other plan beats on all three of
(bytes, estimated latency, summed AUC drop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rewrite.core.atomic import atomic_path
from rewrite.cost.ilp import Constraints, Infeasible, Problem, solve
from rewrite.cost.types import Variant

MEMORY_POINTS = 8


def _point(p: Problem, choice: dict[str, Variant], batch: int) -> dict[str, Any]:
    return {"bytes": p.footprint(choice).total, "latency_s": p.plan_cost(choice, batch).total,
            "auc_drop_sum": sum(v.auc_drop for v in choice.values()),
            "tables": {t: v.pass_spec for t, v in choice.items()}}


def dominated(a: dict, b: dict) -> bool:
    """b is at least as good as a everywhere and better somewhere."""
    keys = ("bytes", "latency_s", "auc_drop_sum")
    return all(b[k] <= a[k] for k in keys) and any(b[k] < a[k] for k in keys)


def frontier(p: Problem, batch: int, max_auc_drop: float | None, labelled: bool) -> list[dict[str, Any]]:
    smallest = p.footprint(solve(p, Constraints(), batch, objective="memory").choice).total
    largest = p.footprint(solve(p, Constraints(), batch, objective="auc").choice).total
    budgets = sorted({int(b) for b in np.geomspace(smallest, max(largest, smallest), MEMORY_POINTS)})
    q = max_auc_drop or max((v.auc_drop for v in p.flat), default=0.0)
    quality = [0.0, q / 4, q / 2, q, 2 * q, None] if labelled else [None]
    seen, points = set(), []
    for m in budgets:
        for qb in quality:
            try:
                choice = solve(p, Constraints(memory_budget=m, max_auc_drop=qb), batch).choice
            except Infeasible:
                continue
            sig = tuple((t, v.key) for t, v in sorted(choice.items()))
            if sig not in seen:
                seen.add(sig)
                points.append(_point(p, choice, batch))
    front = [a for a in points if not any(dominated(a, b) for b in points)]
    return sorted(front, key=lambda d: (d["bytes"], d["latency_s"]))


def plot(points: list[dict], chosen: dict | None, path: Path | str, title: str) -> None:
    """Bytes (x, log) vs latency (y), colour = summed AUC drop; the chosen plan starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [d["bytes"] / 2**20 for d in points]
    y = [d["latency_s"] * 1e3 for d in points]
    sc = ax.scatter(x, y, c=[d["auc_drop_sum"] for d in points], cmap="viridis", zorder=2)
    fig.colorbar(sc, ax=ax, label="AUC drop (sum of per-table, measured)")
    if chosen is not None:
        ax.scatter([chosen["bytes"] / 2**20], [chosen["latency_s"] * 1e3], marker="*", s=220,
                   facecolors="none", edgecolors="red", label="chosen plan", zorder=3)
        ax.legend(loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("model bytes (MiB)")
    ax.set_ylabel("estimated latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
