"""TorchRec-preprocessed Criteo: ``<prefix>_dense.npy``, ``<prefix>_sparse.npy``, ``<prefix>_labels.npy``.

As ``BinaryCriteoUtils.tsv_to_npys`` writes them (torchrec/datasets/criteo.py): dense float32
[N, 13] holding log(x + 3) already, sparse int32 [N, 26] holding int(hex, 16) wrapped to int32
(or contiguous ids after ``sparse_to_contiguous``), labels int32 [N, 1].  Integer dense arrays
(raw counts) are accepted too.  All three are memory-mapped; TorchRec maps sparse values to
rows with ``sparse % num_embeddings`` (numpy: result in [0, rows)), which is hash mode "mod".

Any of the three paths, or the shared prefix (``day_0`` or ``day_0_``), opens the triplet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rewrite.data import Dataset
from rewrite.data_formats.common import IdMap
from rewrite.core.errors import RewriteError

PARTS = ("dense", "sparse", "labels")


def triplet_paths(path: Path) -> dict[str, Path] | None:
    """The three files if ``path`` names one of them or their prefix; None if it names neither."""
    name = path.name
    for part in PARTS:
        if name.endswith(f"_{part}.npy"):
            stem = name[: -len(f"_{part}.npy")]
            break
    else:
        if path.exists() or not any(path.with_name(f"{name.removesuffix('_')}_{p}.npy").exists()
                                    for p in PARTS):
            return None
        stem = name.removesuffix("_")
    return {p: path.with_name(f"{stem}_{p}.npy") for p in PARTS}


def _load(path: Path) -> np.ndarray:
    if not path.exists():
        raise RewriteError(f"{path}: missing; TorchRec data come as <prefix>_dense.npy, "
                           f"<prefix>_sparse.npy and <prefix>_labels.npy side by side")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RewriteError(f"{path}: not a readable .npy array ({str(e).splitlines()[0]})") from None


def open_triplet(paths: dict[str, Path], dense_transform: str, ids: IdMap) -> Dataset:
    dense, sparse, labels = (_load(paths[p]) for p in PARTS)
    n = dense.shape[0] if dense.ndim else -1
    if dense.ndim != 2 or sparse.ndim != 2 or sparse.shape[0] != n:
        raise RewriteError(f"{paths['dense']}: dense {dense.shape} and sparse {sparse.shape} must be "
                           f"2-D with the same number of rows")
    if labels.shape not in ((n,), (n, 1)):
        raise RewriteError(f"{paths['labels']}: labels have shape {labels.shape}, expected ({n}, 1)")
    if not np.issubdtype(sparse.dtype, np.integer):
        raise RewriteError(f"{paths['sparse']}: sparse must hold integers, found {sparse.dtype}")
    if np.issubdtype(dense.dtype, np.floating):
        stored = "log3"  # tsv_to_npys stores log(x + 3)
    elif np.issubdtype(dense.dtype, np.integer):
        stored = "raw"
    else:
        raise RewriteError(f"{paths['dense']}: dense must hold numbers, found {dense.dtype}")
    return Dataset(paths["dense"], dense, sparse, labels.reshape(n), dense_transform,
                   dense_stored=stored, ids=ids)
