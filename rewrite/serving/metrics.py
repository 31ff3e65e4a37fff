"""Server metrics: Prometheus text at ``/metrics`` and one info log line per interval.

Every series is labelled with the model name.  Histograms (seconds): ``rewrite_queue_seconds``
(arrival to the start of its batch), ``rewrite_compute_seconds`` (the batch's ``predict``, by
path), ``rewrite_request_seconds`` (arrival to answer, in the server); ``rewrite_batch_samples``
(merged batch sizes).  Counters: ``rewrite_requests_total`` (by outcome: ok, bad_request,
too_large, timeout, unavailable, error), ``rewrite_path_batches_total`` /
``rewrite_path_samples_total`` (the path chosen); gauges ``rewrite_queue_samples``,
``rewrite_path_auc`` (the path's verified AUC, when known) and ``rewrite_dispatch_level``.
Each server owns its registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the server)

log = logging.getLogger("rewrite.serve")
SECONDS = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
SAMPLES = tuple(float(2 ** k) for k in range(13))


class Metrics:
    def __init__(self, model: str):
        self.model = model
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rewrite_requests", "infer requests by outcome", ["model", "outcome"], registry=r)
        self.queue = Histogram("rewrite_queue_seconds", "time in the queue", ["model"], buckets=SECONDS, registry=r)
        self.compute = Histogram("rewrite_compute_seconds", "predict time per merged batch", ["model", "path"],
                                 buckets=SECONDS, registry=r)
        self.total = Histogram("rewrite_request_seconds", "arrival to answer", ["model"], buckets=SECONDS,
                               registry=r)
        self.batch = Histogram("rewrite_batch_samples", "samples per merged batch", ["model"], buckets=SAMPLES,
                               registry=r)
        self.path_batches = Counter("rewrite_path_batches", "merged batches per path", ["model", "path"], registry=r)
        self.path_samples = Counter("rewrite_path_samples", "samples per path", ["model", "path"], registry=r)
        self.queued = Gauge("rewrite_queue_samples", "samples waiting", ["model"], registry=r)
        self.auc = Gauge("rewrite_path_auc", "verified AUC of the path", ["model", "path"], registry=r)
        self.level = Gauge("rewrite_dispatch_level", "current accuracy level (0 = most accurate)", ["model"],
                           registry=r)
        self._children: dict = {}
        self._window: list[float] = []
        self._window_errors = 0
        self._window_paths: dict[str, int] = {}
        self._window_start = time.monotonic()
        self.set_queued(0)       # exported from the start, not from the first request on

    def _child(self, metric, *labels: str):
        """``metric.labels(model, *labels)``, looked up once (prometheus_client's ``labels`` takes
        ~3 us, and a request touched ten of them)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.model, *labels)
        return child

    def request(self, outcome: str, seconds: float | None = None) -> None:
        self._child(self.requests, outcome).inc()
        if outcome == "ok" and seconds is not None:
            self._child(self.total).observe(seconds)
            self._window.append(seconds)
        elif outcome != "ok":
            self._window_errors += 1

    def set_queued(self, samples: int) -> None:
        self._child(self.queued).set(samples)

    def batch_done(self, path: str, samples: int, compute_s: float, queue_s: list[float], level: int) -> None:
        self._child(self.compute, path).observe(compute_s)
        self._child(self.batch).observe(samples)
        self._child(self.path_batches, path).inc()
        self._child(self.path_samples, path).inc(samples)
        self._child(self.level).set(level)
        q = self._child(self.queue)
        for s in queue_s:
            q.observe(s)
        self._window_paths[path] = self._window_paths.get(path, 0) + samples

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def log_window(self) -> str:
        """Log (info) and return one line summarising the requests since the last call."""
        now = time.monotonic()
        span, lat = now - self._window_start, np.array(self._window)
        total = sum(self._window_paths.values()) or 1
        shares = ", ".join(f"{p} {n / total:.0%}" for p, n in sorted(self._window_paths.items()))
        line = (f"{self.model}: {len(lat)} ok, {self._window_errors} errors in {span:.0f} s "
                f"({len(lat) / max(span, 1e-9):.1f} req/s)"
                + (f", p50 {1e3 * np.percentile(lat, 50):.2f} ms, p99 {1e3 * np.percentile(lat, 99):.2f} ms"
                   if len(lat) else "") + (f"; paths {shares}" if shares else ""))
        log.info(line)
        self._window, self._window_errors, self._window_paths, self._window_start = [], 0, {}, now
        return line
