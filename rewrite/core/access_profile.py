"""Access profiling, FAE-style: count row accesses on a sample of the inputs.

For each table: lookups, distinct rows touched, the share of lookups that hit the top 1% / 10%
of rows, a Zipf exponent (least-squares slope of log count vs log rank over the touched rows),
and the hot set: the fewest rows that cover a target share of lookups, or the rows that fit a
byte budget and the share they cover.  Per-row counts are kept (sparse: touched rows only) so
passes can weight their fits by frequency.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rewrite.core.atomic import write_text
from rewrite.core.errors import RewriteError

PROFILE_VERSION = 1


@dataclass
class TableProfile:
    name: str
    rows: int
    dim: int
    counts: np.ndarray   # int64 [rows]: sampled accesses per row

    @property
    def lookups(self) -> int:
        return int(self.counts.sum())

    def ranked(self) -> np.ndarray:
        """Row ids, most accessed first (ties by row id)."""
        return np.lexsort((np.arange(self.rows), -self.counts))

    def coverage_of_top(self, fraction: float) -> float:
        k = max(1, int(round(self.rows * fraction)))
        top = np.sort(self.counts)[::-1][:k]
        return float(top.sum() / max(1, self.lookups))

    def hot_rows_for_coverage(self, target: float) -> int:
        c = np.cumsum(np.sort(self.counts)[::-1])
        if self.lookups == 0:
            return 0
        return int(np.searchsorted(c, target * self.lookups) + 1)

    def coverage_of_rows(self, k: int) -> float:
        return float(np.sort(self.counts)[::-1][:k].sum() / max(1, self.lookups))

    def zipf_exponent(self) -> float:
        c = np.sort(self.counts[self.counts > 0])[::-1].astype(np.float64)
        if len(c) < 3:
            return float("nan")
        r = np.log(np.arange(1, len(c) + 1))
        slope = np.polyfit(r, np.log(c), 1)[0]
        return float(-slope)

    def summary(self, coverage: float, hot_bytes: int | None) -> dict[str, Any]:
        out = {"name": self.name, "rows": self.rows, "lookups": self.lookups,
               "touched_rows": int((self.counts > 0).sum()),
               "top_1pct_coverage": self.coverage_of_top(0.01),
               "top_10pct_coverage": self.coverage_of_top(0.10),
               "zipf_exponent": self.zipf_exponent(),
               "hot_rows_for_coverage": self.hot_rows_for_coverage(coverage)}
        if hot_bytes is not None:
            k = min(self.rows, hot_bytes // (self.dim * 4))
            out["hot_rows_in_budget"] = int(k)
            out["hot_budget_coverage"] = self.coverage_of_rows(int(k))
        return out


@dataclass
class AccessProfile:
    tables: dict[str, TableProfile]
    samples: int
    sample_rate: float
    source: str

    def counts(self, table: str) -> np.ndarray:
        return self.tables[table].counts

    def to_json(self, coverage: float = 0.9, hot_bytes: int | None = None) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION, "source": self.source, "samples": self.samples,
            "sample_rate": self.sample_rate, "coverage_target": coverage, "hot_bytes": hot_bytes,
            "tables": [t.summary(coverage, hot_bytes) for t in self.tables.values()],
            "counts": {name: _encode_counts(t.counts) for name, t in self.tables.items()},
        }

    def save(self, path: Path | str, coverage: float = 0.9, hot_bytes: int | None = None) -> None:
        write_text(path, json.dumps(self.to_json(coverage, hot_bytes), indent=1))

    @classmethod
    def load(cls, path: Path | str, model=None) -> "AccessProfile":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            tables = {}
            for t in d["tables"]:
                counts = _decode_counts(d["counts"][t["name"]], t["rows"])
                dim = model.embeddings[t["name"]].dim if model is not None else 0
                tables[t["name"]] = TableProfile(t["name"], t["rows"], dim, counts)
            prof = cls(tables, int(d["samples"]), float(d["sample_rate"]), d.get("source", ""))
        except FileNotFoundError:
            raise RewriteError(f"{path}: no such profile file") from None
        except (ValueError, KeyError, TypeError) as e:
            raise RewriteError(f"{path}: not a dlrm-rewrite profile ({type(e).__name__}: {e})") from None
        if model is not None:
            for name, rep in model.embeddings.items():
                if name not in tables or tables[name].rows != rep.rows:
                    raise RewriteError(f"{path}: profile does not match the model (table {name})")
        return prof


def _encode_counts(counts: np.ndarray) -> dict[str, str]:
    """Touched rows only, as base64 little-endian int64 ids and counts."""
    ids = np.flatnonzero(counts).astype("<i8")
    return {"ids": base64.b64encode(ids.tobytes()).decode(),
            "counts": base64.b64encode(counts[ids].astype("<i8").tobytes()).decode()}


def _decode_counts(d: dict[str, str], rows: int) -> np.ndarray:
    ids = np.frombuffer(base64.b64decode(d["ids"]), dtype="<i8")
    vals = np.frombuffer(base64.b64decode(d["counts"]), dtype="<i8")
    if len(ids) != len(vals) or (len(ids) and (ids.min() < 0 or ids.max() >= rows)):
        raise ValueError("counts do not match the table's rows")
    out = np.zeros(rows, dtype=np.int64)
    out[ids] = vals
    return out


