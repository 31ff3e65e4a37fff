"""Training with early stopping: the state with the best validation AUC is the one returned."""

import pytest
import torch

from rewrite import data
from rewrite.core.synthetic import Synthetic, SyntheticConfig, write_npz
from rewrite.training import evaluate, fit, table_dlrm

torch.set_num_threads(1)


def test_fit_keeps_the_epoch_with_the_best_validation_auc(tmp_path):
    gen = Synthetic(SyntheticConfig(rows=(60, 400, 30), n_pairs=2, seed=1))
    write_npz(tmp_path / "a.npz", *gen.sample(4000, seed=0))
    write_npz(tmp_path / "b.npz", *gen.sample(2000, seed=1))
    day0, day1 = data.open(tmp_path / "a.npz"), data.open(tmp_path / "b.npz")
    model, history = fit(table_dlrm([60, 400, 30], dim=8, seed=3), day0, day1, max_epochs=4, patience=1, lr=5e-2)
    assert 1 <= len(history) <= 4
    assert evaluate(model, day1).auc == pytest.approx(max(history))
