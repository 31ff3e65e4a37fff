"""``rewrite profile``: count row accesses per table on a sample of a data set (FAE-style).

Before: a model and a data reader (``rewrite.data.open``).  After: an ``AccessProfile``
(``rewrite.core.access_profile``: counts per row, coverage and skew statistics, JSON file).
On N ranks (``group``) rank k counts chunks k, k+N, ... and the counts are all-reduced (int64
sums: exactly the one-process profile).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from rewrite.core.access_profile import AccessProfile, TableProfile
from rewrite.core.errors import RewriteError
from rewrite.data import Dataset, check_matches
from rewrite.distributed import SINGLE, Group


def profile(model, data: Dataset, sample_rate: float = 1.0, seed: int = 0,
            batch_size: int = 65536, group: Group = SINGLE) -> AccessProfile:
    """Count accesses per row of every table on a Bernoulli(sample_rate) sample of ``data``
    (any reader of ``rewrite.data.open``: its ``id_chunks`` gives row numbers per feature);
    ``group``: the ranks sharing the chunks (every rank gets the whole profile)."""
    features = model.spec.features
    check_matches(data, model.spec.n_dense, len(features))
    counts = {name: np.zeros(rep.rows, dtype=np.int64) for name, rep in model.embeddings.items()}
    samples, error = 0, None
    try:
        for cat in tqdm(data.id_chunks(sample_rate, seed, batch_size, shard=(group.rank, group.world)),
                        desc="profile", unit="chunk", leave=False,
                        disable=None):   # a bar only on a terminal: redirected stderr stays clean
            samples += len(cat)
            for f, (_, table) in enumerate(features):
                ids = cat[:, f]
                n = counts[table].shape[0]
                if ids.size and (ids.min() < 0 or ids.max() >= n):
                    raise RewriteError(f"{data.path}: feature {f} has ids outside table {table}'s "
                                       f"range [0, {n}) (max {ids.max()}): data and model do not match "
                                       f"(hashed ids need a hash mode, e.g. --hash-mode mod)")
                counts[table] += np.bincount(ids, minlength=n)
    except Exception as e:   # noqa: BLE001 (on N ranks: shared, and every rank fails with it)
        if not group.distributed:
            raise
        error = e
    if group.distributed:
        group.agree(error)
        total = group.all_reduce_sum(np.concatenate([*counts.values(), [samples]]))
        samples, lo = int(total[-1]), 0
        for name, c in counts.items():
            counts[name], lo = total[lo:lo + len(c)], lo + len(c)
    tables = {name: TableProfile(name, rep.rows, rep.dim, counts[name])
              for name, rep in model.embeddings.items()}
    return AccessProfile(tables, samples, sample_rate, str(data.path))
