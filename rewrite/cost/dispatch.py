"""A dispatch policy across batch sizes (MP-Rec's per-query path switching; our own rule).

MP-Rec switches representation/hardware path per query; its exact online rule was not
verifiable, so this is the rule we designed:

1. Paths.  The primary path is the plan selected at the reference batch.  The same problem is
   solved at every batch size of a ladder (1 ... 16384); a solution becomes an extra path only
   if it is at least ``MIN_GAIN`` (10%) faster, by the estimate, than every path already kept at
   some ladder size (smaller gains are within the model's error and would only add memory), if
   its whole-plan AUC drop is measured within the budget, and if all paths together still fit
   the memory budget (tables with the same setting in two paths are counted once).  At most
   ``MAX_PATHS`` paths.
2. Ranges.  A request of B rows runs on the path with the lowest estimated latency at B; the
   switch points are where the paths' latency curves cross (found by bisection between ladder
   sizes), so the policy is a list of [min_batch, max_batch] -> path ranges.
3. Latency target T.  ``max_batch_within_target`` is the largest B whose dispatched latency is
   <= T: the runtime splits larger requests into chunks of that size.
"""

from __future__ import annotations

from typing import Callable

from rewrite.dispatch import route
from rewrite.cost.select import Measure, Selected
from rewrite.cost.ilp import Constraints, Infeasible, Problem, solve
from rewrite.cost.types import Variant

LADDER = (1, 8, 64, 256, 1024, 4096, 16384)    # batch sizes the policy is solved at
MIN_GAIN = 0.10                                  # an extra path must be >= 10% faster somewhere
MAX_PATHS = 3
MAX_BATCH = 1 << 20                              # search bound for max_batch_within_target

RULE = ("each request of B rows runs on the path with the lowest estimated latency at B "
        "(ranges below); extra paths kept only where >= 10% faster; requests larger than "
        "max_batch_within_target are split into chunks of that size")


def resident_bytes(p: Problem, paths: list[dict[str, Variant]]) -> int:
    """Bytes of all paths together: one copy of each distinct (table, setting), plus the MLPs."""
    distinct = {(v.table, v.pass_spec): v.num_bytes for choice in paths for v in choice.values()}
    return p.dense_bytes + sum(distinct.values())


def _crossing(f: Callable[[int], float], g: Callable[[int], float], lo: int, hi: int) -> int:
    """Smallest B in (lo, hi] where g(B) < f(B), given f wins at lo and g at hi."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if g(mid) < f(mid):
            hi = mid
        else:
            lo = mid
    return hi


def design_dispatch(p: Problem, primary: Selected, max_auc_drop: float | None = None,
                    measure: Measure | None = None, ladder: tuple[int, ...] = LADDER
                    ) -> tuple[dict[str, dict[str, Variant]], dict]:
    """(paths by name, the policy JSON) following the rule in the module docstring.
    ``max_auc_drop``: the user's limit, checked on each extra path's measured drop."""
    c: Constraints = primary.constraints
    paths = {"p0": primary.solution.choice}
    measured = {"p0": primary.measured_auc_drop}
    lat = lambda choice, b: p.plan_cost(choice, b).total  # noqa: E731
    for b in ladder:
        if len(paths) >= MAX_PATHS:
            break
        try:
            cand = solve(p, c, b).choice
        except Infeasible:
            continue
        if any(cand == kept for kept in paths.values()):
            continue
        gains = [1 - lat(cand, x) / min(lat(k, x) for k in paths.values()) for x in ladder]
        if max(gains) < MIN_GAIN:
            continue
        budget = c.memory_budget
        if budget is not None and resident_bytes(p, [*paths.values(), cand]) > budget:
            continue
        drop = measure(cand) if measure is not None else None
        if drop is not None and max_auc_drop is not None and drop > max_auc_drop:
            continue
        name = f"p{len(paths)}"
        paths[name], measured[name] = cand, drop
    fns = {name: (lambda b, ch=choice: lat(ch, b)) for name, choice in paths.items()}
    best = lambda b: min(fns, key=lambda n: fns[n](b))  # noqa: E731
    ranges, start, current = [], 1, best(ladder[0])
    for lo, hi in zip(ladder, ladder[1:]):
        nxt = best(hi)
        if nxt != current:
            cut = _crossing(fns[current], fns[nxt], lo, hi)
            ranges.append({"min_batch": start, "max_batch": cut - 1, "path": current})
            start, current = cut, nxt
    ranges.append({"min_batch": start, "max_batch": None, "path": current})
    policy = {"rule": RULE, "ladder": list(ladder), "min_gain": MIN_GAIN, "ranges": ranges,
              "source": p.estimator.source,
              "latency_s": {name: {str(b): fns[name](b) for b in ladder} for name in paths},
              "auc_drop_measured": measured,
              "resident_bytes": resident_bytes(p, list(paths.values()))}
    if c.latency_target is not None:
        policy["latency_target_s"] = c.latency_target[0]
        policy["max_batch_within_target"] = max_batch_within(lambda b: fns[route(ranges, b)](b),
                                                             c.latency_target[0])
    return paths, policy


def max_batch_within(latency: Callable[[int], float], target: float) -> int:
    """Largest B <= MAX_BATCH with latency(B) <= target (0 if even B = 1 misses it)."""
    if latency(1) > target:
        return 0
    lo, hi = 1, MAX_BATCH
    if latency(hi) <= target:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if latency(mid) <= target else (lo, mid)
    return lo
