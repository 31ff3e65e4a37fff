"""A bundle's dispatch policy: which path serves a request of B rows.

A policy is a list of ranges ``{"min_batch", "max_batch" (None: unbounded), "path"}`` covering
1..inf (plus, for plans, a latency target's chunk size).  Two builders, one router:
* ``measured_ranges``: per batch-size range the path with the lowest latency measured at compile
  time (``rewrite compile`` with several targets);
* ``plan_ranges``: the plan's ranges (``rewrite.cost.dispatch.design_dispatch`` designed them from
  estimates), each served by the fastest verified target of its plan path;
* ``route``: the path a request of B rows runs on (the runtime and the cost model both use it).
"""

from __future__ import annotations

from typing import Any


def route(ranges: list[dict[str, Any]], batch: int, default: str | None = None) -> str:
    """The path whose range holds ``batch``; ``default`` (or ValueError) when none does."""
    for r in ranges:
        if r["min_batch"] <= batch and (r["max_batch"] is None or batch <= r["max_batch"]):
            return r["path"]
    if default is None:
        raise ValueError(f"batch {batch} is not covered by the dispatch ranges")
    return default


def measured_ranges(latency_ms: dict[str, dict[int, float]], default: str | None) -> dict[str, Any]:
    """Per batch-size range, the path with the lowest measured latency.

    latency_ms[path][batch] was measured at a few batch sizes s_0 < s_1 < ...; size s_i owns the
    batches up to the geometric mean of s_i and s_{i+1} (latency grows ~linearly in the batch, so
    the crossover between two measured sizes is taken halfway on a log scale).  Adjacent ranges
    with the same winner merge.  Default path: the winner at the largest measured size.
    """
    sizes = sorted({b for per in latency_ms.values() for b in per})
    if not sizes:
        return {"measured_batch_sizes": [], "ranges": [], "default_path": default}
    winners = [min(latency_ms, key=lambda p: latency_ms[p].get(b, float("inf"))) for b in sizes]
    ranges: list[dict[str, Any]] = []
    lo = 1
    for i, (size, path) in enumerate(zip(sizes, winners)):
        hi = None if i == len(sizes) - 1 else int((size * sizes[i + 1]) ** 0.5)
        if ranges and ranges[-1]["path"] == path:
            ranges[-1]["max_batch"] = hi
        else:
            ranges.append({"min_batch": lo, "max_batch": hi, "path": path})
        lo = (hi or 0) + 1
    return {"measured_batch_sizes": sizes, "ranges": ranges, "default_path": winners[-1]}


def clip_ranges(ranges: list[dict[str, Any]], lo: int, hi: int | None) -> list[dict[str, Any]]:
    """``ranges`` (covering 1..inf) restricted to [lo, hi] (hi None: unbounded)."""
    out = []
    for r in ranges:
        a = max(lo, r["min_batch"])
        b = r["max_batch"] if hi is None else (hi if r["max_batch"] is None else min(hi, r["max_batch"]))
        if b is None or a <= b:
            out.append({"min_batch": a, "max_batch": b, "path": r["path"]})
    return out


def plan_ranges(plan: dict[str, Any], served: dict[str, list[str]],
                  latency: dict[str, dict[int, float]]) -> dict[str, Any]:
    """The bundle's dispatch from the plan's ranges (module docstring); ``served[pK]``: the
    verified bundle paths of plan path pK."""
    everyone = [n for names in served.values() for n in names]
    ranges: list[dict[str, Any]] = []
    fallbacks = []
    for r in plan["dispatch"]["ranges"]:
        lo, hi, want = r["min_batch"], r.get("max_batch"), r["path"]
        candidates = served.get(want) or everyone
        if not served.get(want):
            fallbacks.append({"min_batch": lo, "max_batch": hi, "plan_path": want,
                              "reason": f"plan path {want} has no verified bundle path; "
                                        "served by the fastest verified path (compile-time latency)"})
        fastest = measured_ranges({n: latency[n] for n in candidates}, candidates[0])["ranges"]
        for c in clip_ranges(fastest, lo, hi):
            if ranges and ranges[-1]["path"] == c["path"] and ranges[-1]["max_batch"] == c["min_batch"] - 1:
                ranges[-1]["max_batch"] = c["max_batch"]
            else:
                ranges.append(c)
    ref = int(plan.get("batch") or 1)
    default = next((r["path"] for r in ranges if r["min_batch"] <= ref
                    and (r["max_batch"] is None or ref <= r["max_batch"])), ranges[-1]["path"])
    policy = {"rule": "plan ranges; within a range the fastest verified target of the plan's path "
                      "(compile-time latency); a plan path with no verified bundle path falls back "
                      "to the fastest verified path",
              "plan_rule": plan["dispatch"].get("rule"),
              "measured_batch_sizes": sorted({b for per in latency.values() for b in per}),
              "ranges": ranges, "default_path": default, "fallbacks": fallbacks}
    for key in ("latency_target_s", "max_batch_within_target"):
        if key in plan["dispatch"]:
            policy[key] = plan["dispatch"][key]
    return policy


def batch_range(lo: int, hi: int | None) -> str:
    """A dispatch range in words, for text output: '1-181', '182 and up', 'every batch size'."""
    if hi is None:
        return "every batch size" if lo <= 1 else f"{lo} and up"
    return f"{lo}" if lo == hi else f"{lo}-{hi}"
