"""Choosing a path per merged batch: by batch size alone, or load-aware (MP-Rec style).

Paths are grouped into **levels**: the paths computing the same function (same rewritten model,
``lowered_from``, at the same arithmetic ``precision``) are one level; levels are ordered by
accuracy, best first (AUC from verification on labelled data when the manifest has it, else
precision fp32 > bf16 > int8), ties by cost.  Within a level the path is the one with the lowest
estimated latency for the batch's size, so the batch size always matters.

Cost model: ``est(path, B)`` interpolates the compile-time latency table (``latency_ms`` at
B = 1, 8, 64, 512, 2048) linearly in B (extrapolating the last segment), times a per-path online
correction: an exponential average (weight 0.2) of measured / estimated over served batches.

The load-aware rule (``LoadAware.choose``), designed here because MP-Rec's exact rule was not
published.  At each merged batch of B samples, with Q samples left queued behind it and the
oldest request in it waiting w seconds, a level L projects the worst latency in the system as

    proj(L) = w + est(L, B) + est(L, Q)         (the batch, then the backlog, on level L)

* **down**: if proj(current) > high * target, move to the most accurate level with
  proj <= high * target (the cheapest level if none does);
* **up**: if the next more accurate level has proj <= low * target on ``up_after`` consecutive
  batches and the last switch is at least ``dwell`` seconds old, move up one level;
* otherwise stay.  The gap between ``low`` (0.35) and ``high`` (0.7) and the dwell time are the
  hysteresis: a level is not left and re-entered on every other batch.  ``high`` is below 1
  because proj is a mean-latency estimate and the target is a p99 that also pays HTTP time.

proj sees the queue and the compute, not the time a request spends in HTTP, decoding and
answering, nor how the compute varies, so it can hold a level whose p99 is over the target (the
demo bundle's fp32 level at 80 q/s: proj under 7 ms, measured p99 10.5 ms).  So the measured tail
decides too: ``observe_request`` records each answered request's time in the server (arrival of
the request to its answer), and the p99 of the last ``window`` of them, once ``window / 4`` were
answered on the current level (recomputed every ``window / 16`` answers), is ``tail``:

* **down** also when tail > high * target: one level down at least (the window restarts), and
  the request rate at which that level's tail tripped is remembered;
* **up** also needs tail <= low * target and, for a level whose tail tripped, a request rate
  below ``0.8 *`` the rate at which it tripped: without this memory the policy went back up as
  soon as the cheaper level had calmed the queue, and tripped again (4 switches in 5 s at 80 q/s).
The request rate is the window's: its requests over the time they span.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PRECISION_RANK = {"fp32": 0, "bf16-dense": 1, "int8-tables": 2, "int8-dense": 3}


@dataclass
class PathInfo:
    name: str
    target: str
    precision: str
    lowered_from: str
    auc: float | None
    sizes: np.ndarray                  # measured batch sizes
    ms: np.ndarray                     # compile-time median ms at those sizes
    auc_source: str | None = None      # where ``auc`` came from
    scale: float = 1.0                 # online correction: measured / estimated
    batches: int = 0
    samples: int = 0

    def est(self, b: int) -> float:
        """Estimated seconds for a batch of ``b`` samples."""
        if b <= 0:
            return 0.0
        s, m = self.sizes, self.ms
        if len(s) == 1:
            ms = m[0] * b / s[0]
        elif b <= s[-1]:
            ms = float(np.interp(b, s, m))
        else:
            ms = m[-1] + (m[-1] - m[-2]) / (s[-1] - s[-2]) * (b - s[-1])
        return 1e-3 * ms * self.scale


def path_infos(manifest: dict[str, Any]) -> list[PathInfo]:
    """The verified paths of a bundle with their accuracy and latency tables."""
    out = []
    for name, p in manifest["paths"].items():
        if not p["verification"]["passed"]:
            continue
        lat = {int(b): float(ms) for b, ms in (p.get("latency_ms") or {}).items()}
        if not lat:
            lat = {1: 1.0}
        sizes = np.array(sorted(lat), dtype=np.float64)
        auc = p["verification"].get("auc")
        out.append(PathInfo(name, p["target"], p.get("precision", "fp32"), p["lowered_from"], auc,
                            sizes, np.array([lat[int(b)] for b in sizes]),
                            "manifest (verification)" if auc is not None else None))
    return out


@dataclass
class Level:
    paths: list[PathInfo]

    @property
    def auc(self) -> float | None:
        aucs = [p.auc for p in self.paths if p.auc is not None]
        return max(aucs) if aucs else None

    def best(self, b: int) -> PathInfo:
        return min(self.paths, key=lambda p: p.est(b))


def levels(paths: list[PathInfo]) -> list[Level]:
    """Paths grouped by (model, precision), most accurate level first."""
    groups: dict[tuple[str, str], list[PathInfo]] = {}
    for p in paths:
        groups.setdefault((p.lowered_from, p.precision), []).append(p)
    out = [Level(g) for g in groups.values()]

    def key(lv: Level):
        auc = lv.auc
        return (-(auc if auc is not None else -1.0), min(PRECISION_RANK.get(p.precision, 9) for p in lv.paths),
                min(p.est(64) for p in lv.paths))
    return sorted(out, key=key)


@dataclass
class Decision:
    path: str
    level: int
    projected_s: float
    compute_s: float                   # the estimate for this batch on ``path`` alone


class Policy:
    """Base: bookkeeping shared by every policy (served batches per path, online correction)."""

    name = "policy"

    def __init__(self, paths: list[PathInfo]):
        self.paths = {p.name: p for p in paths}
        self.levels = levels(paths)
        self._lock = threading.Lock()

    def choose(self, batch: int, queued: int, oldest_wait_s: float) -> Decision:
        raise NotImplementedError

    def observe(self, path: str, batch: int, seconds: float) -> None:
        """A batch of ``batch`` samples took ``seconds`` on ``path``: update its correction."""
        with self._lock:
            p = self.paths[path]
            est = p.est(batch) / p.scale
            if est > 0:
                p.scale = float(np.clip(0.8 * p.scale + 0.2 * seconds / est, 0.05, 20.0))
            p.batches += 1
            p.samples += batch

    def observe_request(self, seconds: float) -> None:
        """A request was answered ``seconds`` after it arrived (the load-aware rule uses it)."""

    def report(self) -> dict[str, Any]:
        total = sum(p.samples for p in self.paths.values()) or 1
        served = [p for p in self.paths.values() if p.samples]
        aucs = [(p.auc, p.samples) for p in served if p.auc is not None]
        return {"policy": self.name,
                "levels": [[p.name for p in lv.paths] for lv in self.levels],
                "paths": {n: {"target": p.target, "precision": p.precision, "auc": p.auc,
                              "auc_source": p.auc_source, "batches": p.batches, "samples": p.samples, "share": p.samples / total,
                              "cost_correction": p.scale} for n, p in self.paths.items()},
                # the share-weighted mean of the verified AUCs: what the traffic was served at
                "served_auc_weighted": (sum(a * s for a, s in aucs) / sum(s for _, s in aucs)
                                        if aucs and len(aucs) == len(served) else None)}


class Fixed(Policy):
    """One path for every batch (``--path``): the single-path baseline."""

    def __init__(self, paths: list[PathInfo], path: str):
        super().__init__(paths)
        self.name, self.path = f"fixed:{path}", path

    def choose(self, batch: int, queued: int, oldest_wait_s: float) -> Decision:
        est = self.paths[self.path].est(batch)
        return Decision(self.path, 0, oldest_wait_s + est, est)


class BatchSize(Policy):
    """The bundle's own dispatch ranges (``rewrite.runtime``'s choice): batch size only."""

    name = "batch-size"

    def __init__(self, paths: list[PathInfo], bundle):
        super().__init__(paths)
        self.bundle = bundle

    def choose(self, batch: int, queued: int, oldest_wait_s: float) -> Decision:
        name = self.bundle.path_for_batch(batch)
        est = self.paths[name].est(batch)
        return Decision(name, 0, oldest_wait_s + est, est)


class LoadAware(Policy):
    """MP-Rec-style switching between levels against a p99 target (module docstring)."""

    name = "load-aware"

    def __init__(self, paths: list[PathInfo], target_s: float, high: float = 0.7, low: float = 0.35,
                 up_after: int = 8, dwell_s: float = 0.5, window: int = 256, clock=time.monotonic):
        super().__init__(paths)
        self.target_s, self.high, self.low = target_s, high, low
        self.up_after, self.dwell_s, self.clock = up_after, dwell_s, clock
        self.current, self.calm, self.last_switch, self.switches = 0, 0, -1e9, 0
        self._recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)
        self._tail: float | None = None       # tail() as last computed, and answers since then
        self._fresh_for = max(1, window // 16)
        self._since_tail = 0
        self.tripped_rate: dict[int, float] = {}   # level -> request rate at which its tail tripped

    def observe_request(self, seconds: float) -> None:
        """One request answered ``seconds`` after it arrived (module docstring: tail)."""
        with self._lock:
            self._recent.append((self.clock(), seconds))
            self._since_tail += 1

    def tail(self) -> float | None:
        """p99 of the recent requests on the current level, or None while fewer than window/4;
        recomputed once window/16 more were answered (the percentile took ~70 us, and ``choose``
        runs for every batch: more than a batch of one computes)."""
        if len(self._recent) < self._recent.maxlen // 4:
            return None
        if self._tail is None or self._since_tail >= self._fresh_for:
            self._tail = float(np.percentile([s for _, s in self._recent], 99))
            self._since_tail = 0
        return self._tail

    def rate(self) -> float | None:
        """Requests per second over the recent window, or None while fewer than window/4."""
        if len(self._recent) < self._recent.maxlen // 4:
            return None
        span = self._recent[-1][0] - self._recent[0][0]
        return (len(self._recent) - 1) / span if span > 0 else float("inf")

    def _calm_rate(self, level: int) -> bool:
        """Is the request rate low enough to try ``level`` again (module docstring: up)?"""
        if level not in self.tripped_rate:
            return True
        rate = self.rate()
        return rate is not None and rate < 0.8 * self.tripped_rate[level]

    def _switch(self, level: int, now: float) -> None:
        self.current, self.last_switch, self.switches, self.calm = level, now, self.switches + 1, 0
        self._recent.clear()
        self._tail, self._since_tail = None, 0

    def projected(self, level: int, batch: int, queued: int, wait: float) -> float:
        lv = self.levels[level]
        return wait + lv.best(batch).est(batch) + (lv.best(queued).est(queued) if queued else 0.0)

    def choose(self, batch: int, queued: int, oldest_wait_s: float) -> Decision:
        with self._lock:
            now = self.clock()
            proj = lambda lv: self.projected(lv, batch, queued, oldest_wait_s)  # noqa: E731
            cur, high, low = self.current, self.high * self.target_s, self.low * self.target_s
            tail = self.tail()
            tail_over = tail is not None and tail > high
            if proj(cur) > high or tail_over:
                ok = [lv for lv in range(len(self.levels)) if proj(lv) <= high]
                new = ok[0] if ok else min(range(len(self.levels)), key=proj)
                if tail_over:
                    new = max(new, min(cur + 1, len(self.levels) - 1))
                    self.tripped_rate[cur] = self.rate()
                self.calm = 0
                if new != cur:
                    self._switch(new, now)
            elif cur > 0 and proj(cur - 1) <= low and (tail is None or tail <= low) and self._calm_rate(cur - 1):
                self.calm += 1
                if self.calm >= self.up_after and now - self.last_switch >= self.dwell_s:
                    self._switch(cur - 1, now)
            else:
                self.calm = 0
            lv = self.current
            path = self.levels[lv].best(batch)
            return Decision(path.name, lv, proj(lv), path.est(batch))

    def report(self) -> dict[str, Any]:
        tail = self.tail()
        return {**super().report(), "p99_target_ms": 1e3 * self.target_s, "current_level": self.current,
                "switches": self.switches, "recent_p99_ms": None if tail is None else 1e3 * tail}
