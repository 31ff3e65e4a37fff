"""What the load generator sends: query sizes and fresh request bodies.

Query sizes (samples per query), ``parse_sizes(spec)``:

* ``mlperf``: MLPerf Inference's DLRM query-size distribution (the reference
  ``recommendation/dlrm_v2/pytorch/tools/dist_quantile.txt``): 20 quantiles at steps of 0.05,
  100, 100, 200 x12, 300, 300, 400, 500, 600, 700 samples; a query draws one uniformly (mean 270);
* ``lognormal:median=M,p99=P``: round(M * exp(sigma * z)), sigma = ln(P / M) / 2.326, at least 1;
* ``fixed:N``.
Every size is capped at ``cap`` (the server's ``--max-batch``), so no query is refused for size.

Ids and dense features (``RequestPool``): from a data file (``rewrite.data.open``: dlrm .npz,
TorchRec .npy, Criteo TSV; consecutive rows, one id per feature, labels kept so the served AUC
can be computed), from an access profile (``rewrite profile -o``: each table's ids drawn in
proportion to their sampled counts), or uniform over each table.  The pool pre-encodes distinct
binary v2 requests so the generator spends no time building them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rewrite.core.errors import RewriteError
from rewrite.serving.protocol import encode_request

MLPERF_QUANTILES = (100, 100) + (200,) * 12 + (300, 300, 400, 500, 600, 700)
Z99 = 2.3263478740408408


@dataclass(frozen=True)
class QuerySizes:
    kind: str
    a: float = 0.0
    b: float = 0.0
    cap: int = 2048

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "mlperf":
            s = np.asarray(MLPERF_QUANTILES)[rng.integers(0, len(MLPERF_QUANTILES), n)]
        elif self.kind == "lognormal":
            sigma = math.log(self.b / self.a) / Z99
            s = np.rint(self.a * np.exp(sigma * rng.standard_normal(n)))
        else:
            s = np.full(n, self.a)
        return np.clip(s, 1, self.cap).astype(np.int64)

    def describe(self) -> str:
        return {"mlperf": "mlperf (100-700, mean 270)", "fixed": f"fixed:{int(self.a)}",
                "lognormal": f"lognormal:median={self.a:g},p99={self.b:g}"}[self.kind] + f", cap {self.cap}"


def parse_sizes(spec: str, cap: int) -> QuerySizes:
    """``mlperf``, ``fixed:N`` or ``lognormal:median=M,p99=P`` -> QuerySizes, or RewriteError."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "mlperf" and not rest:
            return QuerySizes("mlperf", cap=cap)
        if kind == "fixed":
            n = int(rest)
            if n >= 1:
                return QuerySizes("fixed", n, cap=cap)
        if kind == "lognormal":
            kv = dict(p.split("=", 1) for p in rest.split(","))
            m, p = float(kv["median"]), float(kv["p99"])
            if 1 <= m < p:
                return QuerySizes("lognormal", m, p, cap=cap)
    except (ValueError, KeyError):
        pass
    raise RewriteError(f"--sizes {spec!r}: expected mlperf, fixed:N (N >= 1) or lognormal:median=M,p99=P "
                       f"(1 <= M < P)")


class RequestPool:
    """``count`` pre-encoded requests; ``pick(size, rng)`` -> (body, headers, labels or None)."""

    def __init__(self, rows: list[int], n_dense: int, sizes: QuerySizes, count: int, seed: int = 0,
                 data: Path | None = None, profile: Path | None = None, binary: bool = True):
        rng = np.random.default_rng(seed)
        self.sizes = sizes.sample(count, rng)
        self.items = []
        ds = self._dataset(data, n_dense, len(rows)) if data else None
        weights = self._weights(profile, rows) if profile else None
        pos = 0
        for b in self.sizes:
            b = int(b)
            if ds is not None:
                if pos + b > ds.n_samples:
                    pos = 0
                batch = ds.batch(slice(pos, pos + b))
                pos += b
                dense, idx, off = batch.dense.numpy(), batch.indices.numpy(), batch.offsets.numpy()
                labels = None if batch.labels is None else batch.labels.numpy()
            else:
                dense = np.log1p(rng.exponential(8.0, (b, n_dense))).astype(np.float32)
                if weights is None:
                    idx = np.concatenate([rng.integers(0, r, b) for r in rows])
                else:
                    idx = np.concatenate([rng.choice(len(w), b, p=w) for w in weights])
                off, labels = np.arange(len(rows) * b + 1, dtype=np.int64), None
            body, headers = encode_request(dense, idx.astype(np.int64), off, binary)
            self.items.append((body, headers, labels, (dense, idx, off)))
        self.by_size: dict[int, list[int]] = {}
        for k, b in enumerate(self.sizes):
            self.by_size.setdefault(int(b), []).append(k)

    @staticmethod
    def _dataset(path: Path, n_dense: int, n_features: int):
        from rewrite import data

        ds = data.open(path)
        data.check_matches(ds, n_dense, n_features)
        return ds

    @staticmethod
    def _weights(path: Path, rows: list[int]) -> list[np.ndarray]:
        from rewrite.core.access_profile import AccessProfile

        prof = AccessProfile.load(path)
        tables = list(prof.tables.values())
        if [t.rows for t in tables] != list(rows):
            raise RewriteError(f"{path}: profile tables do not match the served model's table rows")
        return [(t.counts + 0.01) / (t.counts + 0.01).sum() for t in tables]

    def __len__(self) -> int:
        return len(self.items)
