"""Every representation on this branch, as one list the target tests iterate over.

Add a representation by appending one (name, factory) entry: factory(rows, dim, generator)
returns a fitted-looking module (random weights at a trained model's scale).
"""

from __future__ import annotations

import torch

from passes.mixed_dim import MDBag
from passes.quotient_remainder import QRBag
from rewrite.embedding import Representation, TableBag
from rewrite.model import ModelSpec, RecModel

DIM = 8


def _randn(g, *shape, std=0.3):
    return torch.randn(*shape, generator=g) * std


def _fill(rep: Representation, g) -> Representation:
    with torch.no_grad():
        for p in rep.parameters():
            p.copy_(_randn(g, *p.shape).to(p.dtype))
    return rep


REPRESENTATIONS = [
    ("table-fp32", lambda r, d, g: TableBag(r, d, weight=_randn(g, r, d))),
    ("table-fp16", lambda r, d, g: TableBag(r, d, dtype="float16", weight=_randn(g, r, d))),
    ("table-bf16", lambda r, d, g: TableBag(r, d, dtype="bfloat16", weight=_randn(g, r, d))),
    ("table-mean", lambda r, d, g: TableBag(r, d, pooling="mean", weight=_randn(g, r, d))),
    ("qr-mult", lambda r, d, g: _fill(QRBag(r, d, collisions=4, op="mult"), g)),
    ("qr-concat-pool-first", lambda r, d, g: _fill(QRBag(r, d, collisions=7, op="concat", pool_first=True), g)),
    ("qr-add-float-quotient", lambda r, d, g: _fill(QRBag(r, d, collisions=3, op="add", float_quotient=True), g)),
    ("md", lambda r, d, g: _fill(MDBag(r, d, inner_dim=4), g)),
]
ROWS = (97, 1000, 5, 3001, 64, 777, 12, 250)   # cycled over the representations


def composite_model(representations=REPRESENTATIONS, seed: int = 0, shared_table: bool = True) -> RecModel:
    """One table per representation (plus a second feature reading the first table, when
    ``shared_table``), dot interaction, small MLPs."""
    g = torch.Generator().manual_seed(seed)
    tables = {f"t{i}_{name}": make(ROWS[i % len(ROWS)], DIM, g)
              for i, (name, make) in enumerate(representations)}
    names = list(tables)
    features = [(f"f{i}", t) for i, t in enumerate(names)]
    if shared_table:
        features.append((f"f{len(names)}", names[0]))
    spec = ModelSpec(n_dense=5, bottom=(16, DIM), top=(32, 16, 1), features=tuple(features))
    torch.manual_seed(seed)
    return RecModel(spec, tables).eval()
