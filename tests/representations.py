"""Every representation, as one list the target tests iterate over.

Add a representation by appending one (name, factory) entry: factory(rows, dim, generator)
returns a fitted-looking module: random weights at a trained model's scale, or the pass itself
run on a random table (``_via_pass``: the module the pass really produces, with a Zipf profile
so hot-row forms have hot rows; fits are kept to a few steps).
"""

from __future__ import annotations

import torch

import copy

import numpy as np

from passes.mixed_dim import MDBag
from passes.quotient_remainder import QRBag
from rewrite.core.embedding import Representation, TableBag
from rewrite.core.model import ModelSpec, RecModel
from rewrite.core.pass_contract import parse_pass
from rewrite.pass_manager import apply
from rewrite.core.access_profile import AccessProfile, TableProfile

DIM = 8


def _randn(g, *shape, std=0.3):
    return torch.randn(*shape, generator=g) * std


def _fill(rep: Representation, g) -> Representation:
    with torch.no_grad():
        for p in rep.parameters():
            p.copy_(_randn(g, *p.shape).to(p.dtype))
    return rep


def _via_pass(spec: str, rows: int | None = None):
    """factory running ``-p spec`` on a random fp32 table (``rows`` overrides the cycled count)."""

    def make(r, d, g):
        r = rows or max(r, 500)          # the compressing passes skip tables they cannot shrink
        table = TableBag(r, d, weight=_randn(g, r, d))
        one = RecModel(ModelSpec(n_dense=1, bottom=(d,), top=(1,), features=(("f", "t"),)), {"t": table})
        counts = np.random.default_rng(0).zipf(1.3, 20 * r) % r
        prof = AccessProfile({"t": TableProfile("t", r, d, np.bincount(counts, minlength=r))}, 20 * r, 1.0, "zipf")
        rewritten, report = apply(one, [parse_pass(spec)], profile=prof)
        rep = rewritten.embeddings["t"]
        assert rep is not table, f"{spec} skipped: {report.tables[0].reason}"
        return rep

    return make


REPRESENTATIONS = [
    ("table-fp32", lambda r, d, g: TableBag(r, d, weight=_randn(g, r, d))),
    ("table-fp16", lambda r, d, g: TableBag(r, d, dtype="float16", weight=_randn(g, r, d))),
    ("table-bf16", lambda r, d, g: TableBag(r, d, dtype="bfloat16", weight=_randn(g, r, d))),
    ("table-mean", lambda r, d, g: TableBag(r, d, pooling="mean", weight=_randn(g, r, d))),
    ("qr-mult", lambda r, d, g: _fill(QRBag(r, d, collisions=4, op="mult"), g)),
    ("qr-concat-pool-first", lambda r, d, g: _fill(QRBag(r, d, collisions=7, op="concat", pool_first=True), g)),
    ("qr-add-float-quotient", lambda r, d, g: _fill(QRBag(r, d, collisions=3, op="add", float_quotient=True), g)),
    ("md", lambda r, d, g: _fill(MDBag(r, d, inner_dim=4), g)),
    ("int8-rowwise", _via_pass("quantize:bits=8")),
    ("int4-rowwise", _via_pass("quantize:bits=4")),
    ("int2-rowwise", _via_pass("quantize:bits=2")),
    ("hash", _via_pass("hash:collisions=4:min_rows=0")),
    ("onehot", _via_pass("onehot", rows=60)),
    ("tt", _via_pass("tt:rank=4:sweeps=1:min_rows=0")),
    ("tt-cache-int8", _via_pass("tt:rank=4:sweeps=1:cache_rows=16:core_bits=8:min_rows=0")),
    ("prune-dims", _via_pass("prune-dims:keep=0.5:min_rows=0")),
    ("hot-cold-int4", _via_pass("hot-cold:coverage=0.5:min_rows=0:cold=quantize:bits=4")),
    ("dhe", _via_pass("dhe:k=16:hidden=16,8:buckets=1000:steps=20:max_error=10:min_rows=0")),
    ("hybrid", _via_pass("hybrid:slots=64:k=8:hidden=8:buckets=1000:steps=20:max_error=10:min_rows=0")),
    ("memrec", _via_pass("memrec:tokens=128:weight_rows=32:steps=20:max_error=10:min_rows=0")),
    ("robe", _via_pass("robe:size=256:block=4:max_error=10:min_rows=0")),
    ("mdq-int4", _via_pass("mdq:bits=4:inner_dim=3")),
    ("mdq-int8-full", _via_pass("mdq:bits=8:energy=1")),
    ("mdq-int2-shared-bytes", _via_pass("mdq:bits=2:inner_dim=2")),
]
ROWS = (97, 1000, 5, 3001, 64, 777, 12, 250)   # cycled over the representations


_BUILT: dict[tuple, RecModel] = {}


def composite_model(representations=REPRESENTATIONS, seed: int = 0, shared_table: bool = True) -> RecModel:
    """One table per representation (plus a second feature reading the first table, when
    ``shared_table``), dot interaction, small MLPs.  Built once per session (the fitted passes
    take seconds), a fresh deep copy per call."""
    key = (tuple(name for name, _ in representations), seed, shared_table)
    if key not in _BUILT:
        _BUILT[key] = _build(representations, seed, shared_table)
    return copy.deepcopy(_BUILT[key])


def _build(representations, seed: int, shared_table: bool) -> RecModel:
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
