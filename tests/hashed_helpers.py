"""Helpers for the hashed-representation tests (DHE, hybrid, MEM-REC, ROBE, recovery): export, batches, profiles."""

from __future__ import annotations

import torch
from torch.export import Dim

from rewrite.core.model import RecModel
from rewrite.core.synthetic import multi_hot_batch
from targets.base import ExportedBags


def ragged_batches(model: RecModel, n: int = 3, batch: int = 64, seed: int = 0):
    """Ragged multi-hot batches with empty bags and every table's largest id."""
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    return [multi_hot_batch(rows, batch, model.spec.n_dense, mean_len=2.5, seed=seed + i) for i in range(n)]


def export_bags(model: RecModel, batch) -> torch.export.ExportedProgram:
    """``torch.export`` of ``ExportedBags(model)`` with dynamic batch size and lookup counts."""

    f = len(model.spec.features)
    bounds = batch.offsets[:: batch.size].tolist()
    bags = []
    for i in range(f):
        lo = bounds[i]
        bags += [batch.indices[lo:bounds[i + 1]], batch.offsets[i * batch.size:(i + 1) * batch.size + 1] - lo]
    dyn = {"dense": {0: Dim.DYNAMIC}, "bags": tuple({0: Dim.DYNAMIC} for _ in bags)}
    return torch.export.export(ExportedBags(model).eval(), (batch.dense, *bags), dynamic_shapes=dyn)


def zipf_profile(model: RecModel, exponent: float = 1.1, lookups: int = 20_000, seed: int = 0):
    """An AccessProfile with Zipf-skewed counts per table (hot rows scattered by a permutation)."""
    import numpy as np

    from rewrite.core.access_profile import AccessProfile, TableProfile

    rng = np.random.default_rng(seed)
    tables = {}
    for name, rep in model.embeddings.items():
        p = (np.arange(rep.rows) + 1.0) ** -exponent
        counts = rng.multinomial(lookups, p / p.sum())[rng.permutation(rep.rows)].astype(np.int64)
        tables[name] = TableProfile(name, rep.rows, rep.dim, counts)
    return AccessProfile(tables, lookups, 1.0, "zipf test profile")


def roundtrip(model: RecModel, tmp_path) -> RecModel:
    """save + load through the native format; asserts every tensor comes back bit-exact."""
    import rewrite

    path = tmp_path / "model.safetensors"
    rewrite.save(model, path)
    back = rewrite.load(path)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    return back


def pooled_reference(rows_of, indices, offsets, pooling: str = "sum"):
    """Independent bag pooling with a Python loop: rows_of(ids [n]) -> [n, d] numpy."""
    import numpy as np

    idx, off = indices.numpy(), offsets.numpy()
    per_id = rows_of(idx) if len(idx) else None
    dim = per_id.shape[1] if per_id is not None else 0
    out = np.zeros((len(off) - 1, dim))
    for b in range(len(off) - 1):
        if off[b + 1] > off[b]:
            out[b] = per_id[off[b]:off[b + 1]].sum(0)
            if pooling == "mean":
                out[b] /= off[b + 1] - off[b]
    return out
