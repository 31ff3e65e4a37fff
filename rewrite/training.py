"""Training a table DLRM from scratch (the demo and benchmarks make their own trained model)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from rewrite.data import Dataset
from rewrite.core.embedding import TableBag
from rewrite.core.metrics import auc, logloss
from rewrite.core.model import ModelSpec, RecModel


def table_dlrm(rows: list[int], n_dense: int = 13, dim: int = 16, bottom: tuple[int, ...] = (64, 16),
               top: tuple[int, ...] = (64, 32, 1), seed: int = 0) -> RecModel:
    """A freshly initialised dot-interaction DLRM (dlrm's init: tables U(±sqrt(1/rows)))."""
    g = torch.Generator().manual_seed(seed)
    tables = {}
    for i, r in enumerate(rows):
        bound = float(np.sqrt(1.0 / r))
        w = (torch.rand(r, dim, generator=g) * 2 - 1) * bound
        tables[f"t{i}"] = TableBag(r, dim, weight=w)
    spec = ModelSpec(n_dense=n_dense, bottom=(*bottom[:-1], dim), top=top,
                     features=tuple((f"f{i}", f"t{i}") for i in range(len(rows))))
    torch.manual_seed(seed)
    return RecModel(spec, tables)


@dataclass
class Evaluation:
    auc: float
    logloss: float
    n: int


@torch.no_grad()
def evaluate(model: RecModel, data: Dataset, batch_size: int = 4096, limit: int | None = None,
             start: int = 0) -> Evaluation:
    model.eval()
    logits, labels = [], []
    for b in data.batches(batch_size, limit=limit, start=start):
        logits.append(model(*b.inputs()).numpy())
        labels.append(b.labels.numpy())
    z, y = np.concatenate(logits), np.concatenate(labels)
    return Evaluation(auc(y, z), logloss(y, z), len(y))


def train(model: RecModel, data: Dataset, epochs: int = 1, batch_size: int = 512, lr: float = 2e-3,
          seed: int = 0, limit: int | None = None, desc: str = "train",
          opt: torch.optim.Optimizer | None = None) -> RecModel:
    """Adam on BCE-with-logits over shuffled batches, progress bar on stderr (``opt``: continue
    with this optimiser and its state instead of a fresh Adam at ``lr``)."""
    opt = opt or torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    n = data.n_samples if limit is None else min(limit, data.n_samples)
    for epoch in range(epochs):
        bar = tqdm(data.batches(batch_size, limit=n, shuffle_seed=seed + epoch),
                   total=-(-n // batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch",
                   leave=False)
        for b in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(*b.inputs()), b.labels)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval()


def fit(model: RecModel, data: Dataset, valid: Dataset, max_epochs: int = 10, patience: int = 2,
        batch_size: int = 512, lr: float = 2e-3, seed: int = 0, desc: str = "train") -> tuple[RecModel, list[float]]:
    """``train`` epoch by epoch, keeping the state with the best AUC on ``valid``.

    Stops after ``patience`` epochs without a better validation AUC (small real data sets
    overfit within a few epochs).  Returns the model holding the best state and the per-epoch
    validation AUCs.
    """
    import copy

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, history, bad = -1.0, copy.deepcopy(model.state_dict()), [], 0
    for epoch in range(max_epochs):
        train(model, data, epochs=1, batch_size=batch_size, seed=seed + epoch, opt=opt,
              desc=f"{desc} {epoch + 1}/{max_epochs}")
        history.append(evaluate(model, valid).auc)
        if history[-1] > best:
            best, best_state, bad = history[-1], copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), history
