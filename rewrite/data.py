"""Sample and calibration data: readers that yield canonical ``Batch``es.

dlrm-processed ``.npz`` (``X_int [N, 13]``, ``X_cat [N, F]``, ``y [N]``): the dense transform is
dlrm's ``log(max(x, 0) + 1)`` by default (``dense_transform="none"`` keeps values as stored).
Uncompressed members are memory-mapped straight out of the zip, so a day file is not read into
memory to take a sample of it.
"""

from __future__ import annotations

import builtins
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from rewrite.batch import Batch, batch_from_dense_ids
from rewrite.errors import RewriteError

DENSE_TRANSFORMS = ("log1p", "none")


def transform_dense(x: np.ndarray, how: str) -> np.ndarray:
    """dlrm: log(max(x, 0) + 1); "none": as stored."""
    x = np.asarray(x, dtype=np.float32)
    if how == "log1p":
        return np.log1p(np.maximum(x, 0.0))
    if how == "none":
        return x
    raise RewriteError(f"unknown dense transform {how!r} (choose from {', '.join(DENSE_TRANSFORMS)})")


def _npz_member(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """Memory-map an uncompressed .npy member of a zip; read a compressed one."""
    info = zf.getinfo(name)
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        header_len = f.tell()
    if info.compress_type == zipfile.ZIP_STORED and not dtype.hasobject:
        with builtins.open(path, "rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len + header_len
        return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape,
                         order="F" if fortran else "C")
    with zf.open(name) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


@dataclass
class Dataset:
    """Rows of a data file; ``batches`` yields canonical one-id-per-feature batches."""

    path: Path
    dense: np.ndarray           # [N, n_dense] as stored (transformed per batch)
    cat: np.ndarray             # [N, F] ids
    labels: np.ndarray | None   # [N]
    dense_transform: str = "log1p"

    @property
    def n_samples(self) -> int:
        return self.cat.shape[0]

    @property
    def n_dense(self) -> int:
        return self.dense.shape[1]

    @property
    def n_features(self) -> int:
        return self.cat.shape[1]

    def batch(self, rows: np.ndarray | slice) -> Batch:
        y = None if self.labels is None else np.asarray(self.labels[rows], dtype=np.float32)
        return batch_from_dense_ids(transform_dense(self.dense[rows], self.dense_transform),
                                    np.asarray(self.cat[rows], dtype=np.int64), y)

    def batches(self, batch_size: int, limit: int | None = None, shuffle_seed: int | None = None,
                start: int = 0) -> Iterator[Batch]:
        """Consecutive batches over rows [start, start+limit) (a seeded permutation if asked)."""
        end = self.n_samples if limit is None else min(self.n_samples, start + limit)
        if shuffle_seed is None:
            for lo in range(start, end, batch_size):
                yield self.batch(slice(lo, min(lo + batch_size, end)))
        else:
            order = np.random.default_rng(shuffle_seed).permutation(np.arange(start, end))
            for lo in range(0, len(order), batch_size):
                yield self.batch(np.sort(order[lo:lo + batch_size]))

    def sample_rows(self, rate: float, seed: int = 0) -> np.ndarray:
        """Bernoulli(rate) sample of row numbers (FAE-style input sampling)."""
        if not 0 < rate <= 1:
            raise RewriteError(f"sample rate must be in (0, 1], got {rate}")
        if rate == 1:
            return np.arange(self.n_samples)
        keep = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,))).random(self.n_samples) < rate
        return np.flatnonzero(keep)


def open(path: str | Path, dense_transform: str = "log1p") -> Dataset:  # noqa: A001 (rewrite.data.open)
    """Open a dlrm-processed .npz (X_int, X_cat, y) without loading it whole."""
    path = Path(path)
    if not path.exists():
        raise RewriteError(f"{path}: no such data file")
    transform_dense(np.zeros((1, 1)), dense_transform)  # validates the name early
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise RewriteError(f"{path}: not an .npz archive ({e})") from None
    with zf:
        names = {n.removesuffix(".npy"): n for n in zf.namelist()}
        missing = [k for k in ("X_int", "X_cat") if k not in names]
        if missing:
            raise RewriteError(f"{path}: missing array(s) {', '.join(missing)}; a dlrm .npz has "
                               f"X_int [N, 13], X_cat [N, F] and y [N] (found {', '.join(names) or 'none'})")
        try:
            arrays = {k: _npz_member(path, zf, names[k]) for k in ("X_int", "X_cat", "y") if k in names}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise RewriteError(f"{path}: unreadable array in the archive ({e})") from None
    dense, cat, y = arrays["X_int"], arrays["X_cat"], arrays.get("y")
    if dense.ndim != 2 or cat.ndim != 2 or dense.shape[0] != cat.shape[0]:
        raise RewriteError(f"{path}: X_int {dense.shape} and X_cat {cat.shape} must be 2-D with "
                           f"the same number of rows")
    if not np.issubdtype(cat.dtype, np.integer):
        raise RewriteError(f"{path}: X_cat must hold integer ids, found {cat.dtype}")
    if y is not None and y.shape != (cat.shape[0],):
        raise RewriteError(f"{path}: y has shape {y.shape}, expected ({cat.shape[0]},)")
    return Dataset(path, dense, cat, y, dense_transform)


def check_matches(ds: Dataset, n_dense: int, n_features: int) -> None:
    if ds.n_dense != n_dense or ds.n_features != n_features:
        raise RewriteError(f"{ds.path}: data has {ds.n_dense} dense and {ds.n_features} categorical "
                           f"columns, the model takes {n_dense} and {n_features}")


def labels_tensor(batch: Batch) -> torch.Tensor:
    if batch.labels is None:
        raise RewriteError("these data have no labels (y)")
    return batch.labels
