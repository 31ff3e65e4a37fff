"""The canonical batch and its validation (see ``rewrite.core.model`` for the layout)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rewrite.core.errors import RewriteError


@dataclass
class Batch:
    dense: torch.Tensor             # float32 [B, n_dense], already transformed
    indices: torch.Tensor           # int64 [N], feature-major
    offsets: torch.Tensor           # int64 [F*B + 1]
    labels: torch.Tensor | None = None   # float32 [B] in {0, 1}

    @property
    def size(self) -> int:
        return self.dense.shape[0]

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.dense, self.indices, self.offsets

    def feature_ids(self, n_features: int) -> list[torch.Tensor]:
        """The ids of each feature's lookups (views)."""
        bounds = self.offsets[:: self.size].tolist()
        return [self.indices[bounds[f]:bounds[f + 1]] for f in range(n_features)]


def batch_from_dense_ids(dense: np.ndarray, cat: np.ndarray, labels: np.ndarray | None) -> Batch:
    """One-hot rows (cat [B, F], one id per feature per sample) -> canonical Batch."""
    b, f = cat.shape
    indices = torch.from_numpy(np.ascontiguousarray(cat.T).reshape(-1).astype(np.int64))
    offsets = torch.arange(b * f + 1, dtype=torch.int64)
    y = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.float32))
    return Batch(torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)), indices, offsets, y)


def validate(batch: Batch, n_dense: int, table_rows: list[int], where: str = "batch") -> Batch:
    """Check shapes, offsets and id ranges against a model; cast int32 ids to int64.

    table_rows[f] is the row count of feature f's table.  Raises RewriteError naming the problem.
    """
    dense, indices, offsets = batch.dense, batch.indices, batch.offsets
    n_features = len(table_rows)
    if dense.dim() != 2 or dense.shape[1] != n_dense:
        raise RewriteError(f"{where}: dense must be [B, {n_dense}], got {list(dense.shape)}")
    if not dense.is_floating_point():
        raise RewriteError(f"{where}: dense must be floating point, got {dense.dtype}")
    if indices.dtype not in (torch.int32, torch.int64) or offsets.dtype not in (torch.int32, torch.int64):
        raise RewriteError(f"{where}: indices and offsets must be int32 or int64 "
                           f"(got {indices.dtype}, {offsets.dtype})")
    b = dense.shape[0]
    if indices.dim() != 1:
        raise RewriteError(f"{where}: indices must be 1-D [N], got {list(indices.shape)}")
    if offsets.dim() != 1 or offsets.numel() != n_features * b + 1:
        raise RewriteError(f"{where}: offsets must have F*B+1 = {n_features * b + 1} entries "
                           f"(F={n_features}, B={b}), got {list(offsets.shape)}")
    offsets = offsets.to(torch.int64)
    if offsets[0].item() != 0 or offsets[-1].item() != indices.numel():
        raise RewriteError(f"{where}: offsets must start at 0 and end at len(indices)="
                           f"{indices.numel()} (got {offsets[0].item()} .. {offsets[-1].item()})")
    if bool((offsets[1:] < offsets[:-1]).any()):
        at = int(torch.nonzero(offsets[1:] < offsets[:-1])[0, 0])
        raise RewriteError(f"{where}: offsets decrease at position {at + 1}")
    indices = indices.to(torch.int64)
    bounds = offsets[::b].tolist() if b else [0] * (n_features + 1)
    for f, rows in enumerate(table_rows):
        ids = indices[bounds[f]:bounds[f + 1]]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
            bad = int(ids[(ids < 0) | (ids >= rows)][0])
            raise RewriteError(f"{where}: feature {f} has id {bad} outside its table's "
                               f"range [0, {rows})")
    labels = batch.labels
    if labels is not None and labels.shape != (b,):
        raise RewriteError(f"{where}: labels must be [B]={b}, got {list(labels.shape)}")
    return Batch(dense.to(torch.float32), indices, offsets, labels)


def split_bags_np(indices: np.ndarray, offsets: np.ndarray, n_features: int) -> list[np.ndarray]:
    """Canonical feature-major bags -> [idx_0, off_0, ...] with each off_f starting at 0 (int64)."""
    batch = (len(offsets) - 1) // n_features
    bounds = offsets[::batch]
    out: list[np.ndarray] = []
    for f in range(n_features):
        lo, hi = int(bounds[f]), int(bounds[f + 1])
        out.append(np.ascontiguousarray(indices[lo:hi], dtype=np.int64))
        out.append(np.ascontiguousarray(offsets[f * batch:(f + 1) * batch + 1] - lo, dtype=np.int64))
    return out


def bucket_rows(m: int) -> int:
    """``m`` rounded up to a number with at most four significant bits (..., 256, 288, 320, ...,
    512, 576, ...; up to 16 unchanged).  oneDNN builds a primitive for every row count it meets:
    torch-fast's MLPs took ~9 ms per batch the first time a size came, ~0.7 ms after (demo model,
    9-1024 rows), and with ~1,000 sizes of a few layers each its primitive cache (1,024 entries)
    kept evicting them: a server's merged batches, of ever new sizes, paid it on most batches
    (``benchmarks/varying_batches.py``, AMD EPYC, tier avx512: 2.46 ms per batch in steady state,
    0.82 ms bucketed).  Bucketed, they meet at most 8 sizes
    per octave, for at most 1/8 extra rows."""
    shift = m.bit_length() - 4
    return m if shift <= 0 else -(-m >> shift) << shift


def bucket_sizes(max_rows: int) -> list[int]:
    """Every ``bucket_rows`` value up to ``bucket_rows(max_rows)``: the row counts an engine that
    pads to buckets meets, which a server runs once at start-up so no request pays a first time."""
    return sorted({bucket_rows(m) for m in range(1, max_rows + 1)})
