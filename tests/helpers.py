"""Shared test helpers: small models, access profiles, ragged batches, export and round-trip checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import rewrite
from rewrite.core.batch import Batch
from rewrite.core.model import RecModel
from rewrite.core.access_profile import AccessProfile, TableProfile
from rewrite.core.synthetic import multi_hot_batch
from rewrite.training import table_dlrm
from targets.base import ExportedBags
from rewrite.core.batch import split_bags_np
from tests.tolerances import assert_close


def small_model(rows: tuple[int, ...] = (1000, 300, 37), dim: int = 16, seed: int = 0) -> RecModel:
    """A dot-interaction DLRM whose tables look trained (N(0, 0.1²) rows, not the tiny init)."""
    model = table_dlrm(list(rows), dim=dim, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for t in model.embeddings.values():
            t.weight.copy_(torch.randn(t.weight.shape, generator=g) * 0.1)
    return model.eval()


def zipf_profile(model: RecModel, zipf: float = 1.1, lookups: int = 20_000, seed: int = 0) -> AccessProfile:
    """Zipf(``zipf``) access counts per table over a random permutation of its rows."""
    rng = np.random.default_rng(seed)
    tables = {}
    for name, rep in model.embeddings.items():
        p = (np.arange(rep.rows) + 1.0) ** -zipf
        ranks = rng.choice(rep.rows, size=lookups, p=p / p.sum())
        counts = np.bincount(rng.permutation(rep.rows)[ranks], minlength=rep.rows).astype(np.int64)
        tables[name] = TableProfile(name, rep.rows, rep.dim, counts)
    return AccessProfile(tables, lookups, 1.0, "zipf test profile")


def ragged_batches(model: RecModel, n: int = 3, batch: int = 64, seed: int = 0) -> list[Batch]:
    """Ragged bags with empty bags and every table's largest id."""
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    return [multi_hot_batch(rows, batch, model.spec.n_dense, mean_len=3.0, seed=seed + i)
            for i in range(n)]


def table_bags(batch: Batch, model: RecModel, table: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, offsets) of the first feature that looks up ``table`` in ``batch``."""
    f = model.feature_tables.index(table)
    bags = split_bags_np(batch.indices.numpy(), batch.offsets.numpy(), len(model.feature_tables))
    return torch.from_numpy(bags[2 * f]), torch.from_numpy(bags[2 * f + 1])


def reference_bags(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                   mode: str = "sum") -> torch.Tensor:
    """Independent reference: torch's own EmbeddingBag (float64 accumulation)."""
    return torch.nn.functional.embedding_bag(indices, weight.double(), offsets[:-1], mode=mode,
                                             include_last_offset=False)


def assert_exports(model: RecModel, batch: Batch) -> None:
    """torch.export of ``ExportedBags(model)`` with dynamic batch and lookup counts."""
    n_features = len(model.feature_tables)
    bags = [torch.from_numpy(a) for a in
            split_bags_np(batch.indices.numpy(), batch.offsets.numpy(), n_features)]
    b = torch.export.Dim("B", min=3)   # the segment-sum guards B >= 3
    shapes: list = [{0: b}]
    for f in range(n_features):
        shapes += [{0: torch.export.Dim(f"n{f}", min=2)}, {0: b + 1}]
    ep = torch.export.export(ExportedBags(model).eval(), (batch.dense, *bags), dynamic_shapes=(shapes[0], tuple(shapes[1:])))
    with torch.no_grad():
        want = model(*batch.inputs())
    assert_close(ep.module()(batch.dense, *bags), want, "float32", "exported program vs eager")


def assert_roundtrip(model: RecModel, tmp_path: Path, batch: Batch) -> RecModel:
    """save + load: bit-exact tensors and identical outputs; returns the loaded model."""
    path = tmp_path / "model.safetensors"
    rewrite.save(model, path)
    loaded = rewrite.load(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(model(*batch.inputs()), loaded(*batch.inputs()))
    return loaded
