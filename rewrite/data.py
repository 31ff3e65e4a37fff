"""Sample and calibration data: readers that yield canonical ``Batch``es.  ``open`` detects:

    dlrm-processed ``.npz`` (X_int [N, 13], X_cat [N, F], y [N])       this module
    TorchRec ``*_dense.npy``, ``*_sparse.npy``, ``*_labels.npy``        data_formats.torchrec_npy
    raw Criteo TSV (label, 13 ints, 26 hex; optionally gzipped)        data_formats.criteo_tsv

Array files are memory-mapped (uncompressed .npz members straight out of the zip), so a day
file is not read into memory to take a sample of it; TSV is streamed.  Dense transforms and
id mappings: ``data_formats.common``; with ``model=`` both default to the model's training
stack (TorchRec checkpoints: log(x + 3); dlrm: log(max(x, 0) + 1)).
"""

from __future__ import annotations

import builtins
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from rewrite.core.batch import Batch, batch_from_dense_ids
from rewrite.data_formats.common import (DENSE_TRANSFORMS, IdMap, check_transform, default_transform,
                                         feature_rows, id_map, transform_dense)
from rewrite.core.errors import RewriteError

__all__ = ["DENSE_TRANSFORMS", "Dataset", "check_matches", "labels_tensor", "open", "transform_dense"]


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
    cat: np.ndarray             # [N, F] stored categorical values (mapped per batch)
    labels: np.ndarray | None   # [N]
    dense_transform: str = "log1p"
    dense_stored: str = "raw"   # "raw" counts, or "log3" (TorchRec's preprocessed npy)
    ids: IdMap = IdMap()        # stored values -> rows
    skipped_rows: int = 0       # streamed readers count the bad rows they skipped

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
        return batch_from_dense_ids(transform_dense(self.dense[rows], self.dense_transform, self.dense_stored),
                                    self.ids(np.asarray(self.cat[rows])), y)

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

    def id_chunks(self, rate: float, seed: int = 0, chunk: int = 65536,
                  shard: tuple[int, int] = (0, 1)) -> Iterator[np.ndarray]:
        """Row numbers [n, F] (int64) of a Bernoulli(rate) sample of the rows, chunk by chunk;
        ``shard`` (k, N): only the chunks i with i % N == k (N ranks together read every chunk once)."""
        rows = self.sample_rows(rate, seed)
        for lo in range(shard[0] * chunk, len(rows), shard[1] * chunk):
            yield self.ids(np.asarray(self.cat[rows[lo:lo + chunk]]))

    def sample_rows(self, rate: float, seed: int = 0) -> np.ndarray:
        """Bernoulli(rate) sample of row numbers (FAE-style input sampling)."""
        if not 0 < rate <= 1:
            raise RewriteError(f"sample rate must be in (0, 1], got {rate}")
        if rate == 1:
            return np.arange(self.n_samples)
        keep = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,))).random(self.n_samples) < rate
        return np.flatnonzero(keep)


def open(path: str | Path, dense_transform: str | None = None, *, model=None,  # noqa: A001
         hash_mode: str | None = None, skip_bad_rows: bool = False):
    """Open a data file or TorchRec triplet, detecting its format from its name and content.

    model: gives the table sizes (needed to map hashed ids) and the default dense transform.
    dense_transform: "log1p" | "log3" | "none" (default: the model's, else the format's own).
    hash_mode: "mod" | "torchrec" | "none" (default: "none" for .npz, else "mod" with a model).
    skip_bad_rows: TSV rows that do not parse are counted and skipped instead of an error.
    """
    from rewrite.data_formats import criteo_tsv, torchrec_npy

    path = Path(path)
    rows = feature_rows(model) if model is not None else None
    how = check_transform(dense_transform) if dense_transform else None
    if how is None and model is not None:
        how = default_transform(model)
    triplet = torchrec_npy.triplet_paths(path)
    if triplet is not None:
        return torchrec_npy.open_triplet(triplet, how or "log3", id_map(hash_mode, "mod", rows))
    if not path.exists():
        raise RewriteError(f"{path}: no such data file")
    if path.is_dir():
        raise RewriteError(f"{path}: is a directory; give a data file (.npz, TSV, or a TorchRec "
                           f"*_dense.npy / *_sparse.npy / *_labels.npy)")
    if zipfile.is_zipfile(path) or path.suffix == ".npz":
        return _open_npz(path, how or "log1p", id_map(hash_mode, "none", rows))
    if path.suffix == ".npy":
        raise RewriteError(f"{path}: a lone .npy; TorchRec data come as <prefix>_dense.npy, "
                           f"<prefix>_sparse.npy and <prefix>_labels.npy side by side")
    return criteo_tsv.open_tsv(path, how or "log1p", id_map(hash_mode, "mod", rows), skip_bad_rows)


def _open_npz(path: Path, dense_transform: str, ids: IdMap) -> Dataset:
    """A dlrm-processed .npz (X_int, X_cat, y) without loading it whole."""
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
    return Dataset(path, dense, cat, y, dense_transform, ids=ids)


def check_matches(ds: Dataset, n_dense: int, n_features: int) -> None:
    if ds.n_dense != n_dense or ds.n_features != n_features:
        raise RewriteError(f"{ds.path}: data has {ds.n_dense} dense and {ds.n_features} categorical "
                           f"columns, the model takes {n_dense} and {n_features}")


def labels_tensor(batch: Batch) -> torch.Tensor:
    if batch.labels is None:
        raise RewriteError("these data have no labels (y)")
    return batch.labels
