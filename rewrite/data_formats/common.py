"""What every data reader shares: the dense transform and the categorical id -> row mapping.

Dense transforms (x = the raw Criteo integer column):
    "log1p"  dlrm (dlrm_data_pytorch.py):                 log(max(x, 0) + 1)
    "log3"   TorchRec (BinaryCriteoUtils.tsv_to_npys):    log(x + 3)   (Criteo ints are >= -2)
    "none"   the values as stored
A source says how its dense values are stored: "raw" integers (Criteo TSV, dlrm .npz, integer
.npy) or "log3" (TorchRec's *_dense.npy: tsv_to_npys writes log(x + 3) as float32).  Stored
"log3" values are used as they are for "log3"/"none", and mapped back to the raw count for
"log1p": log(max(exp(v) - 3, 0) + 1) (exact up to float32 rounding of exp).

Id mappings (v = the stored categorical value, r = the table's rows):
    "mod"       v mod r                                   (Criteo TSV: v = int(hex, 16), unsigned)
    "torchrec"  int32(v) mod r, int32 = the low 32 bits read as signed, as TorchRec's int32
                *_sparse.npy hold them, and mod with Python's sign rule (result in [0, r)),
                as TorchRec's ``sparse % hashes`` in numpy
    "none"      v as stored (already a row number, e.g. dlrm's contiguous preprocessing)
For values stored as int32 (TorchRec .npy) "mod" and "torchrec" agree.  Which mapping a model
was trained with is not in its checkpoint: the user says it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rewrite.core.errors import RewriteError

DENSE_TRANSFORMS = ("log1p", "log3", "none")
HASH_MODES = ("mod", "torchrec", "none")
TORCHREC_DENSE_SHIFT = 3  # TorchRec's tsv_to_npys: dense += 3, then log


def check_transform(how: str) -> str:
    if how not in DENSE_TRANSFORMS:
        raise RewriteError(f"unknown dense transform {how!r} (choose from {', '.join(DENSE_TRANSFORMS)})")
    return how


def transform_dense(x: np.ndarray, how: str, stored: str = "raw") -> np.ndarray:
    """Stored dense values -> the model's inputs (float32), per the table above."""
    check_transform(how)
    x = np.array(x, dtype=np.float32)  # a copy: memory-mapped rows are read-only
    if stored == "log3":
        if how != "log1p":
            return x
        x = np.exp(x) - TORCHREC_DENSE_SHIFT
    elif stored != "raw":
        raise ValueError(f"unknown dense storage {stored!r}")
    if how == "log1p":
        return np.log1p(np.maximum(x, 0.0))
    if how == "log3":
        return np.log(x + TORCHREC_DENSE_SHIFT)
    return x


def default_transform(model) -> str:
    """The dense transform of the model's training stack: TorchRec's for TorchRec checkpoints."""
    fmt = model.spec.provenance.get("format") if model is not None else None
    return "log3" if fmt == "torchrec" else "log1p"


def feature_rows(model) -> tuple[int, ...]:
    """Rows of the table each input feature looks up, in input order."""
    return tuple(model.embeddings[t].rows for _, t in model.spec.features)


@dataclass(frozen=True)
class IdMap:
    """Stored categorical values [n, F] -> row numbers (int64), one table size per feature."""

    mode: str = "none"
    rows: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.mode not in HASH_MODES:
            raise RewriteError(f"unknown hash mode {self.mode!r} (choose from {', '.join(HASH_MODES)})")
        if self.mode != "none" and self.rows is None:
            raise RewriteError(f"hash mode {self.mode!r} needs the table sizes: open the data with "
                               f"the model (rewrite.data.open(path, model=...))")

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.mode == "none":
            return np.asarray(values).astype(np.int64, copy=False)
        if len(self.rows) != values.shape[1]:
            raise RewriteError(f"data have {values.shape[1]} categorical columns, the model's "
                               f"tables {len(self.rows)}")
        if self.mode == "torchrec":
            wrapped = (np.asarray(values).astype(np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
            return np.mod(wrapped.view(np.int32).astype(np.int64), np.asarray(self.rows, dtype=np.int64))
        if np.asarray(values).dtype == np.uint64:
            return np.mod(values, np.asarray(self.rows, dtype=np.uint64)).astype(np.int64)
        return np.mod(np.asarray(values).astype(np.int64), np.asarray(self.rows, dtype=np.int64))


def id_map(mode: str | None, default: str, rows: Sequence[int] | None) -> IdMap:
    """The mapping asked for, or the format's default (``"none"`` when no table sizes are known)."""
    chosen = mode or (default if rows is not None else "none")
    return IdMap(chosen, None if rows is None else tuple(int(r) for r in rows))
