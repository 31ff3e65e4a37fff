"""Checking a compiled path against torch eager of the model it was lowered from.

Batches: ragged bags (Poisson lengths, 20% empty, every table's largest id), at batch 1, 7 and
1024; a batch whose bags are all empty; and, when given, batches of a data file.  The error is
max |sigmoid(path) - sigmoid(reference)| over all samples (probabilities: what a user serves),
accepted up to the path's precision tolerance (``targets.base.TOLERANCE``); the largest logit
difference is reported beside it, and AUC on labelled data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from rewrite.core.batch import Batch
from rewrite.core.mapped import logits_by_table
from rewrite.core.model import RecModel
from rewrite.core.synthetic import multi_hot_batch
from targets.base import Runner
from rewrite.core.batch import split_bags_np

RAGGED_SIZES = (1, 7, 1024)     # samples per verification batch
MEAN_BAG = 3.0                  # mean lookups per bag in the ragged batches
EMPTY_FRACTION = 0.2


@dataclass
class Check:
    name: str
    batch: Batch


def table_rows(model: RecModel) -> list[int]:
    return [model.embeddings[t].rows for t in model.feature_tables]


def synthetic_checks(model: RecModel, seed: int = 0) -> list[Check]:
    rows, n_dense = table_rows(model), model.spec.n_dense
    checks = [Check(f"ragged-{b}", multi_hot_batch(rows, b, n_dense, MEAN_BAG, seed + b,
                                                   empty_fraction=EMPTY_FRACTION)) for b in RAGGED_SIZES]
    checks.append(Check("all-empty-4", multi_hot_batch(rows, 4, n_dense, 0.0, seed, empty_fraction=1.0)))
    return checks


def data_checks(dataset, batch_size: int = 4096, limit: int = 16384) -> list[Check]:
    return [Check(f"data-{i}", b) for i, b in enumerate(dataset.batches(batch_size, limit=limit))]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


@torch.inference_mode()
def reference_logits(model: RecModel, checks: Iterable[Check]) -> list[np.ndarray]:
    """Eager logits per check, one table at a time (bounded resident pages of mapped tables)."""
    checks = list(checks)
    return [x.numpy() for x in logits_by_table(model, [c.batch for c in checks])]


def compare(runner: Runner, checks: list[Check], expected: list[np.ndarray], n_features: int,
            tolerance: float) -> dict[str, Any]:
    """Run ``runner`` on every check; the verification record stored in the manifest."""
    worst_p = worst_logit = 0.0
    per_check, labels, ref_scores, path_scores = {}, [], [], []
    for check, ref in zip(checks, expected):
        b = check.batch
        out = runner(b.dense.numpy(), split_bags_np(b.indices.numpy(), b.offsets.numpy(), n_features))
        if out.shape != ref.shape or not np.all(np.isfinite(out)):
            return {"passed": False, "tolerance": tolerance,
                    "failure": f"{check.name}: output shape {list(out.shape)} (expected {list(ref.shape)}) "
                               f"or non-finite values"}
        dp = float(np.abs(sigmoid(out) - sigmoid(ref)).max()) if out.size else 0.0
        dl = float(np.abs(out.astype(np.float64) - ref).max()) if out.size else 0.0
        per_check[check.name] = dp
        worst_p, worst_logit = max(worst_p, dp), max(worst_logit, dl)
        if b.labels is not None:
            labels.append(b.labels.numpy())
            ref_scores.append(ref)
            path_scores.append(out)
    record = {"passed": worst_p <= tolerance, "tolerance": tolerance,
              "max_abs_prob_error": worst_p, "max_abs_logit_error": worst_logit,
              "checks": per_check}
    if labels:
        from rewrite.core.metrics import auc

        y = np.concatenate(labels)
        record["auc"] = auc(y, np.concatenate(path_scores))
        record["reference_auc"] = auc(y, np.concatenate(ref_scores))
    if not record["passed"]:
        worst = max(per_check, key=per_check.get)
        ratio = f" by {worst_p / tolerance:.1f}x" if tolerance > 0 else ""
        record["failure"] = f"max |Δp| {worst_p:.3g} on {worst} exceeds the tolerance {tolerance:g}{ratio}"
    return record
