"""onehot: the one-hot x table GEMM against torch's embedding_bag over the ORIGINAL table (sum
and mean, ragged batches with empty bags and the largest id), its exact bytes, the max_rows and
fp32-only skips with their reasons, the option refusal, round trip, lint and export."""

from __future__ import annotations

import pytest
import torch

import passes
import rewrite
from passes.onehot import OneHotBag, OneHotConfig
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.pass_contract import parse_pass
from rewrite.pass_manager import apply
from tests.helpers import reference_bags, table_bags
from tests.pass_helpers import assert_exports, batches, small_model, with_table
from tests.tolerances import assert_close


@pytest.fixture(scope="module")
def model():
    """Tables of 3, 40, 257 and 1000 rows; t1 mean-pooled."""
    m = small_model()
    return with_table(m, "t1", m.embeddings["t1"].weight.detach().clone(), pooling="mean")


@torch.no_grad()
def test_bags_equal_embedding_bag_on_the_original_table(model):
    rw, report = apply(model, [passes.onehot()])
    assert [t.status for t in report.tables] == ["rewritten", "rewritten", "skipped", "skipped"]
    for name, mode in (("t0", "sum"), ("t1", "mean")):
        rep, original = rw.embeddings[name], model.embeddings[name].weight.detach()
        assert isinstance(rep, OneHotBag) and rep.pooling == mode
        for batch in batches(model):
            idx, off = table_bags(batch, model, name)
            assert int(idx.max()) == rep.rows - 1 and bool((off[1:] == off[:-1]).any())   # largest id, empty bag
            assert_close(rep(idx, off), reference_bags(original, idx, off, mode), "float32", f"{name} {mode}")
    b = batches(model, n=1, seed=7)[0]
    assert_close(rw(*b.inputs()), model(*b.inputs()), "float32", "whole model")


def test_exact_bytes_and_report(model):
    rw, report = apply(model, [passes.onehot(tables=("t1",))])
    # the fp32 table (40 x 8 x 4 B) and the arange it compares ids against (40 x int64)
    assert rw.embeddings["t1"].num_bytes() == 40 * 8 * 4 + 40 * 8 == 1600
    t = report.tables[0]
    assert (t.status, t.bytes_before, t.bytes_after, t.within_tolerance) == ("rewritten", 1280, 1600, True)


def test_skip_reasons(model):
    half = model.with_tables({"t0": TableBag(3, 8, dtype="float16", weight=model.embeddings["t0"].weight)})
    _, report = apply(half, [passes.onehot(max_rows=300)])
    assert {t.table: t.reason for t in report.tables} == {
        "t0": "onehot rewrites fp32 plain tables, this is table 3x8 float16",
        "t1": "", "t2": "", "t3": "1000 rows > max_rows=300"}


def test_option_refusal_and_what_it_touches():
    with pytest.raises(RewriteError) as e:
        parse_pass("onehot:max_rows=0")
    assert str(e.value) == "pass onehot: max_rows must be >= 1"
    assert OneHotConfig().touches() == "tables with at most 128 rows"
    assert OneHotConfig(tables=("t1",), max_rows=5).touches() == "tables t1 with at most 5 rows"


def test_round_trip_lint_and_export(model, tmp_path):
    rw, _ = apply(model, [passes.onehot()])
    rewrite.save(rw, tmp_path / "o.safetensors")
    back = rewrite.load(tmp_path / "o.safetensors")
    for k, v in rw.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ex, check = batches(model, n=2, seed=11)
    with torch.no_grad():
        assert torch.equal(back(*check.inputs()), rw(*check.inputs()))
    rewrite.capture(rw)[0].graph.lint()
    assert_exports(rw, ex, check)
