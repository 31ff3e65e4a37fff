"""Helpers for the passes tests: small models, ragged batches, access profiles, export checks."""

from __future__ import annotations

import numpy as np
import torch
from torch.export import Dim

import pytest

from rewrite.core.batch import Batch
from rewrite.core.embedding import TableBag
from rewrite.core.model import RecModel
from rewrite.core.access_profile import AccessProfile, TableProfile
from rewrite.core.synthetic import multi_hot_batch
from rewrite.training import table_dlrm
from targets.base import ExportedBags
from rewrite.core.batch import split_bags_np
from rewrite.core.errors import RewriteError
from rewrite.core.pass_contract import parse_pass
from tests.tolerances import assert_close


def spec_error(spec: str) -> str:
    """The message of the RewriteError that parsing the pass spec ``spec`` must raise."""
    with pytest.raises(RewriteError) as e:
        parse_pass(spec)
    return str(e.value)


def small_model(rows=(3, 40, 257, 1000), dim: int = 8, seed: int = 0, spread: float = 0.3) -> RecModel:
    """A random dot-interaction DLRM; tables scaled to ``spread`` so values look trained."""
    model = table_dlrm(list(rows), dim=dim, bottom=(16, dim), top=(16, 1), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for t in model.embeddings.values():
            t.weight.copy_(torch.randn(t.weight.shape, generator=g) * spread)
    return model.eval()


def with_table(model: RecModel, name: str, weight: torch.Tensor, pooling: str = "sum") -> RecModel:
    """``model`` with table ``name`` replaced by a plain fp32 table holding ``weight``."""
    return model.with_tables({name: TableBag(weight.shape[0], weight.shape[1], pooling, weight=weight)})


def batches(model: RecModel, n: int = 3, batch: int = 64, mean_len: float = 2.5, seed: int = 0) -> list[Batch]:
    """Ragged batches with empty bags and every table's largest id."""
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    return [multi_hot_batch(rows, batch, model.spec.n_dense, mean_len, seed=seed + i) for i in range(n)]


def bag_inputs(model: RecModel, batch: Batch) -> list[torch.Tensor]:
    arrays = split_bags_np(batch.indices.numpy(), batch.offsets.numpy(), len(model.spec.features))
    return [batch.dense, *(torch.from_numpy(a) for a in arrays)]


def assert_exports(model: RecModel, example: Batch, check: Batch) -> None:
    """``torch.export`` of ``ExportedBags(model)`` with dynamic batch and lookup counts, then the
    exported program on another batch (other sizes, empty bags) equals the eager model."""
    args = bag_inputs(model, example)
    b = Dim("batch", min=4)   # export specialises sizes 0 and 1; the segment-sum guards 4+ offsets
    shapes = [{0: b}]
    for f in range(len(model.spec.features)):
        shapes += [{0: Dim(f"n{f}", min=2)}, {0: b + 1}]
    ep = torch.export.export(ExportedBags(model), tuple(args), dynamic_shapes=(shapes[0], tuple(shapes[1:])))
    with torch.no_grad():
        got = ep.module()(*bag_inputs(model, check))
        want = model(*check.inputs())
    assert_close(got, want, "float32", "exported program vs eager")


def profile_of(model: RecModel, counts: dict[str, "np.ndarray"], samples: int) -> AccessProfile:
    """An access profile with the given per-row counts (other tables: never accessed)."""
    tables = {}
    for name, rep in model.embeddings.items():
        c = counts.get(name, np.zeros(rep.rows, dtype=np.int64))
        tables[name] = TableProfile(name, rep.rows, rep.dim, np.asarray(c, dtype=np.int64))
    return AccessProfile(tables, samples, 1.0, "test")


def model_and_day(d, rows, n: int = 3000):
    """``d/model.pt`` (a small table DLRM in dlrm's format) and ``d/day.npz`` (n labelled samples
    with Zipf ids, the largest ids clipped to each table): the files a CLI test runs on."""
    from rewrite.core.synthetic import write_npz
    from rewrite.formats import dlrm

    dlrm.write(small_model(rows=rows), d / "model.pt")
    rng = np.random.default_rng(0)
    x_cat = np.stack([np.minimum(rng.zipf(1.3, n) - 1, r - 1) for r in rows], axis=1).astype(np.int32)
    x_int = rng.integers(0, 100, (n, 13)).astype(np.int32)
    write_npz(d / "day.npz", x_int, x_cat, (rng.random(n) < 0.3).astype(np.int32))
    return d
