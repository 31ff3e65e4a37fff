"""The composite model the TVM target tests compile once: every representation on this branch.

One table per representation and mode (TableBag fp32 / fp16 / bf16-mean, QR mult / concat /
add over 3e9 ids / dlrm's pool-first float-quotient mode, MD), plus a second feature sharing a
table.  Bag batches come from ``rewrite.core.synthetic.multi_hot_batch`` (Poisson lengths, empty bags,
every table's largest id).
"""

from __future__ import annotations

import torch

from rewrite.core.embedding import TableBag
from rewrite.core.model import ModelSpec, RecModel
from passes.mixed_dim import MDBag
from passes.quotient_remainder import QRBag
from rewrite.core.synthetic import multi_hot_batch

DIM, N_DENSE = 8, 13
# Logits are compared with tests.tolerances' row "compiled-fp32-logits", the same for every
# representation here: fp16 and bf16 tables are widened to fp32 before pooling in both torch and
# TVM, so only fp32 summation order differs.


def _filled(rep, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rep.parameters():
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1).to(p.dtype))
    return rep


def composite_model() -> RecModel:
    tables = {
        "fp32": TableBag(5000, DIM),
        "fp16": TableBag(3000, DIM, dtype="float16"),
        "bf16_mean": TableBag(2000, DIM, pooling="mean", dtype="bfloat16"),
        "qr_mult": QRBag(10_000, DIM, 37, op="mult"),
        "qr_concat": QRBag(1000, DIM, 4, op="concat"),
        "qr_add_3e9": QRBag(3_000_000_000, DIM, 100_003, op="add"),
        "qr_dlrm": QRBag(4000, DIM, 8, op="mult", pool_first=True, float_quotient=True),
        "md": MDBag(2500, DIM, 4),
    }
    tables = {k: _filled(v, i) for i, (k, v) in enumerate(tables.items())}
    features = tuple((f"f_{t}", t) for t in tables) + (("f_shared", "fp32"),)
    spec = ModelSpec(n_dense=N_DENSE, bottom=(16, DIM), top=(16, 1), features=features)
    torch.manual_seed(0)
    return RecModel(spec, tables).eval()


def feature_rows(model: RecModel) -> list[int]:
    return [model.embeddings[t].rows for t in model.feature_tables]


BATCHES = {   # id: (batch size, mean bag length, fraction of empty bags)
    "b1-ragged": (1, 3.0, 0.0),
    "b1-all-empty": (1, 2.0, 1.0),
    "b1-one-id": (1, 1.0, 0.0),
    "b1024-ragged": (1024, 2.5, 0.1),
    "b1500-long": (1500, 6.0, 0.05),
}


def batch(model: RecModel, name: str, seed: int = 7):
    size, mean_len, empty = BATCHES[name]
    return multi_hot_batch(feature_rows(model), size, N_DENSE, mean_len, seed=seed,
                           empty_fraction=empty)
