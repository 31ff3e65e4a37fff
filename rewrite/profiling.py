"""``rewrite profile``: count row accesses per table on a sample of a data set (FAE-style).

Before: a model and a data reader (``rewrite.data.open``).  After: an ``AccessProfile``
(``rewrite.core.access_profile``: counts per row, coverage and skew statistics, JSON file).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from rewrite.core.access_profile import AccessProfile, TableProfile
from rewrite.core.errors import RewriteError
from rewrite.data import Dataset, check_matches


def profile(model, data: Dataset, sample_rate: float = 1.0, seed: int = 0,
            batch_size: int = 65536) -> AccessProfile:
    """Count accesses per row of every table on a Bernoulli(sample_rate) sample of ``data``
    (any reader of ``rewrite.data.open``: its ``id_chunks`` gives row numbers per feature)."""
    features = model.spec.features
    check_matches(data, model.spec.n_dense, len(features))
    counts = {name: np.zeros(rep.rows, dtype=np.int64) for name, rep in model.embeddings.items()}
    samples = 0
    for cat in tqdm(data.id_chunks(sample_rate, seed, batch_size), desc="profile", unit="chunk",
                    leave=False, disable=None):   # a bar only on a terminal: redirected stderr stays clean
        samples += len(cat)
        for f, (_, table) in enumerate(features):
            ids = cat[:, f]
            n = counts[table].shape[0]
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                raise RewriteError(f"{data.path}: feature {f} has ids outside table {table}'s "
                                   f"range [0, {n}) (max {ids.max()}): data and model do not match "
                                   f"(hashed ids need a hash mode, e.g. --hash-mode mod)")
            counts[table] += np.bincount(ids, minlength=n)
    tables = {name: TableProfile(name, rep.rows, rep.dim, counts[name])
              for name, rep in model.embeddings.items()}
    return AccessProfile(tables, samples, sample_rate, str(data.path))
