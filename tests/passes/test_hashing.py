"""hash: the universal hash against Python integers, the weighted-mean fit, bags, bytes, skips,
validation, round trip, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import passes
import rewrite
from passes.hashing import MERSENNE_31, HashBag, fit_hash
from rewrite.core.embedding import TableBag
from rewrite.pass_manager import apply
from tests.pass_helpers import assert_exports, batches, profile_of, small_model, spec_error
from tests.tolerances import assert_close

torch.set_num_threads(1)


def test_bucket_equals_python_integer_hash_without_overflow():
    a, b, m = MERSENNE_31 - 2, MERSENNE_31 - 5, 977
    rep = HashBag(10, 4, m, a, b)
    ids = [0, 1, 2, 976, 10**6, 2**31 - 2, 2**31 - 1, 2**31, 2**40 + 3, 2**62 + 7, 2**63 - 1]
    got = rep.bucket(torch.tensor(ids, dtype=torch.int64)).tolist()
    # Python ints are unbounded: the reference cannot overflow
    assert got == [((a * (i % MERSENNE_31) + b) % MERSENNE_31) % m for i in ids]


def test_fit_is_the_weighted_mean_of_each_bucket():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(500, 6, generator=g)
    weights = np.random.default_rng(1).random(500) + 0.05
    rep = fit_hash(w, weights, 125, seed=[0, 1])
    h = rep.bucket(torch.arange(500)).numpy()
    x = w.numpy().astype(np.float64)
    for bucket in range(125):
        ids = np.flatnonzero(h == bucket)
        expected = np.average(x[ids], axis=0, weights=weights[ids]) if len(ids) else np.zeros(6)
        assert_close(rep.weight[bucket], expected, "weighted-mean-fit", f"bucket {bucket}")


def test_bags_sum_the_hashed_rows():
    model = small_model()
    rw, report = apply(model, [passes.hash(tables=("t3",))])
    rep = rw.embeddings["t3"]
    rows = rep.weight.detach()[rep.bucket(torch.arange(1000))]
    for b in batches(small_model(rows=(1000,)), n=2, mean_len=3.0):
        assert_close(rep(b.indices, b.offsets), TableBag(1000, 8, weight=rows)(b.indices, b.offsets), "float32")
    notes = report.tables[0].notes
    assert notes["buckets"] == 250 and 0 < notes["buckets_used"] <= 250


def test_frequency_weighting_favours_hot_rows():
    model = small_model()
    hot = np.zeros(1000, dtype=np.int64)
    hot[::29] = 1000
    prof = profile_of(model, {"t3": hot}, samples=1000)
    weighted, _ = apply(model, [passes.hash(tables=("t3",))], profile=prof)
    uniform, _ = apply(model, [passes.hash(tables=("t3",))])
    ids = torch.from_numpy(np.flatnonzero(hot))
    ref = model.embeddings["t3"].weight.detach()[ids]
    err = lambda m: float((m.embeddings["t3"].dense_rows(ids).detach() - ref).norm())  # noqa: E731
    assert err(weighted) < 0.5 * err(uniform)


def test_seeded_and_distinct_per_table():
    model = small_model(rows=(3, 400, 1000, 1000))
    a, _ = apply(model, [passes.hash()])
    b, _ = apply(model, [passes.hash()])
    assert a.embeddings["t3"].params() == b.embeddings["t3"].params()
    assert (a.embeddings["t2"].a, a.embeddings["t2"].b) != (a.embeddings["t3"].a, a.embeddings["t3"].b)
    c, _ = apply(model, [passes.hash()], seed=1)
    assert c.embeddings["t3"].a != a.embeddings["t3"].a


def test_bytes_by_hand():
    rw, _ = apply(small_model(), [passes.hash(collisions=3)])
    assert rw.embeddings["t3"].num_bytes() == 4 * 334 * 8      # ceil(1000 / 3) buckets
    assert rw.embeddings["t2"].num_bytes() == 4 * 86 * 8       # ceil(257 / 3)


def test_skip_reasons():
    model = small_model(rows=(200, 201, 1000, 1000))
    model = model.with_tables({"t3": TableBag(1000, 8, dtype="float16", weight=model.embeddings["t3"].weight)})
    _, report = apply(model, [passes.hash()])
    reasons = {t.table: t.reason for t in report.tables}
    assert reasons["t0"] == "200 rows < min_rows=201"
    assert reasons["t3"] == "hash rewrites fp32 plain tables, this is table 1000x8 float16"
    assert {t.table: t.status for t in report.tables}["t1"] == "rewritten"


@pytest.mark.parametrize("spec,message", [
    ("hash:collisions=1", "pass hash: collisions must be >= 2, got 1"),
    ("hash:collisions=many", "pass hash: option collisions='many': must be a whole number"),
    ("hash:max_error=0", "pass hash: max_error must be > 0, got 0.0"),
    ("hash:buckets=8", "pass hash: unknown option 'buckets' (options: collisions, compression, max_error, min_rows, tables)"),
])
def test_config_validation(spec, message):
    assert spec_error(spec) == message
    with pytest.raises(ValueError, match=r"hash parameters need 1 <= a < p and 0 <= b < p"):
        HashBag(10, 4, 3, 0, 0)


def test_max_error_gate():
    _, report = apply(small_model(), [passes.hash(max_error=0.05)])
    assert not report.ok
    assert all(not t.within_tolerance for t in report.tables if t.status == "rewritten")


def test_round_trip_lint_and_export(tmp_path):
    model = small_model()
    rw, _ = apply(model, [passes.hash()])
    rewrite.save(rw, tmp_path / "h.safetensors")
    back = rewrite.load(tmp_path / "h.safetensors")
    assert back.embeddings["t3"].params() == rw.embeddings["t3"].params()
    for k, v in rw.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ex, check = batches(model, n=2, seed=13)
    assert torch.equal(back(*check.inputs()), rw(*check.inputs()))
    rewrite.capture(rw)[0].graph.lint()
    assert_exports(rw, ex, check)
