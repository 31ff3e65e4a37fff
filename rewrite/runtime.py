"""Serving a bundle: ``rewrite.runtime.load("bundle/") -> Predictor``.

    pred = rewrite.runtime.load("bundle/")
    probs = pred.predict(dense, indices, offsets)          # float32 [B], canonical batch convention
    probs = pred.predict(dense, indices, offsets, path="onnx-cpu")   # force a path

``predict`` validates the batch (shapes, offsets from 0 to N and never decreasing, every id in
its table's range: ONNX ``Gather`` wraps negative ids silently), splits it per feature, and runs
the path the bundle's dispatch policy names for its batch size; with a latency target
(``dispatch.max_batch_within_target``, plan bundles) a larger request is split into chunks of
that many rows, each dispatched by its own size.  Paths are loaded on first use.
Imports only the runtime side: the bundle reader, the target's ``load`` (onnxruntime or torch),
never the exporters, quantizers, checkpoint readers or the compiler.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from rewrite.artifact import Bundle, open_bundle
from rewrite.core.errors import RewriteError
from targets.base import CompiledPath, Runner, get_target, require_available, require_tier
from rewrite.core.batch import split_bags_np


def _array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):                     # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_batch(dense, indices, offsets, n_dense: int, table_rows: list[int]):
    """Canonical batch -> (dense f32 [B, n_dense], indices i64, offsets i64), or RewriteError."""
    dense, indices, offsets = _array(dense, "dense"), _array(indices, "indices"), _array(offsets, "offsets")
    n_features = len(table_rows)
    if dense.ndim != 2 or dense.shape[1] != n_dense or not np.issubdtype(dense.dtype, np.floating):
        raise RewriteError(f"dense must be floating point [B, {n_dense}], got {dense.dtype} {list(dense.shape)}")
    for name, a in (("indices", indices), ("offsets", offsets)):
        if a.ndim != 1 or a.dtype not in (np.int32, np.int64):
            raise RewriteError(f"{name} must be a 1-D int32 or int64 array, got {a.dtype} {list(a.shape)}")
    b = dense.shape[0]
    if len(offsets) != n_features * b + 1:
        raise RewriteError(f"offsets must have F*B+1 = {n_features * b + 1} entries (F={n_features}, "
                           f"B={b}), got {len(offsets)}")
    offsets = offsets.astype(np.int64, copy=False)
    if offsets[0] != 0 or offsets[-1] != len(indices):
        raise RewriteError(f"offsets must start at 0 and end at len(indices)={len(indices)} "
                           f"(got {offsets[0]} .. {offsets[-1]})")
    steps = np.diff(offsets)
    if (steps < 0).any():
        raise RewriteError(f"offsets decrease at position {int(np.argmax(steps < 0)) + 1}")
    indices = indices.astype(np.int64, copy=False)
    bounds = offsets[::b] if b else np.zeros(n_features + 1, dtype=np.int64)
    limit = np.repeat(np.asarray(table_rows, dtype=np.int64), np.diff(bounds))   # each id's table size
    out = (indices < 0) | (indices >= limit)                                     # one pass, any F
    if out.any():
        at = int(np.argmax(out))
        f = int(np.searchsorted(bounds, at, side="right")) - 1
        raise RewriteError(f"feature {f} has id {int(indices[at])} outside its table's range "
                           f"[0, {table_rows[f]})")
    return np.ascontiguousarray(dense, dtype=np.float32), indices, offsets


def chunk_bags(bags: list[np.ndarray], lo: int, hi: int) -> list[np.ndarray]:
    """Rows [lo, hi) of split bags [idx_0, off_0, ...] (each off_f from 0, B+1 entries)."""
    out = []
    for idx, off in zip(bags[::2], bags[1::2]):
        a = int(off[lo])
        out += [idx[a:int(off[hi])], off[lo:hi + 1] - a]
    return out


class _Serialized:
    """A runner whose calls hold a lock: a TVM relax VM is not reentrant (4 threads calling one
    VM segfaulted in ``StorageObj::AllocTensor``), and no target promises otherwise.  Callers
    that want parallel calls load one ``Predictor`` per thread (``rewrite serve --workers``)."""

    def __init__(self, run: Runner):
        self._run, self._lock = run, threading.Lock()
        if hasattr(run, "canonical"):
            self.canonical = self._canonical

    def __call__(self, dense, bags):
        with self._lock:
            return self._run(dense, bags)

    def _canonical(self, dense, indices, offsets):
        with self._lock:
            return self._run.canonical(dense, indices, offsets)


class Predictor:
    """A loaded bundle that answers ``predict``.  Thread-safe: each path loads once under a lock
    and its runner's calls are serialized (``_Serialized``); concurrent callers of one Predictor
    therefore take turns per path."""

    def __init__(self, bundle: Bundle, threads: int | None = None):
        from scipy.special import expit     # imported here: 0.2 s that only serving needs

        self._sigmoid = expit               # one float32 ufunc: 0.5 us at batch 1, against 3.8
        self.bundle = bundle
        self.threads = threads
        self._runners: dict[str, Runner] = {}
        self._rows = bundle.table_rows()
        self._load_lock = threading.Lock()

    @property
    def paths(self) -> list[str]:
        return list(self.bundle.paths)

    def runner(self, path: str) -> Runner:
        if path not in self.bundle.paths:
            raise RewriteError(f"{self.bundle.root}: no path {path!r} (paths: {', '.join(self.bundle.paths)})")
        entry = self.bundle.paths[path]
        if not entry["verification"]["passed"]:
            raise RewriteError(f"{self.bundle.root}: path {path!r} failed verification at compile time "
                               f"({entry['verification'].get('failure', 'see manifest')}); not served")
        with self._load_lock:
            if path not in self._runners:
                target = require_available(get_target(entry["target"]))
                compiled = CompiledPath(entry["target"], [f["path"] for f in entry["files"]], entry["options"])
                require_tier(target, compiled)
                self._runners[path] = _Serialized(
                    target.load(self.bundle.path_dir(path), compiled, threads=self.threads))
        return self._runners[path]

    def logits(self, dense, indices, offsets, path: str | None = None, validate: bool = True) -> np.ndarray:
        if validate:
            dense, indices, offsets = check_batch(dense, indices, offsets, self.bundle.n_dense, self._rows)
        b = dense.shape[0]
        if b == 0:
            return np.zeros(0, dtype=np.float32)
        chunk = self.bundle.manifest["dispatch"].get("max_batch_within_target") or b
        if path is not None or b <= chunk:
            run = self.runner(path or self.bundle.path_for_batch(b))
            if hasattr(run, "canonical"):          # a runner that takes the canonical batch as is
                return run.canonical(dense, indices, offsets)
            return run(dense, split_bags_np(indices, offsets, len(self._rows)))
        bags = split_bags_np(indices, offsets, len(self._rows))
        return np.concatenate([self.runner(self.bundle.path_for_batch(min(b, lo + chunk) - lo))(
            dense[lo:lo + chunk], chunk_bags(bags, lo, min(b, lo + chunk))) for lo in range(0, b, chunk)])

    def predict(self, dense, indices, offsets, path: str | None = None, validate: bool = True) -> np.ndarray:
        """Click probabilities float32 [B] (the logits' sigmoid in float32, within 1 ulp of the
        float64 one); ``path`` forces a path, ``validate=False`` skips the input checks (only for
        batches already known to be well formed)."""
        return self._sigmoid(self.logits(dense, indices, offsets, path, validate).astype(np.float32, copy=False))


def load(bundle: str | Path, threads: int | None = None, check_files: bool = True) -> Predictor:
    """Open a bundle (format and sha256 of every file checked) for serving."""
    return Predictor(open_bundle(bundle, check_files), threads)
