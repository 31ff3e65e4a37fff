import numpy as np
import pytest
import torch

import passes
import rewrite
from passes.hot_cold_split import HotColdBag, _cold_sample
from passes.tensor_train import TTBag
from rewrite.core.embedding import TableBag
from rewrite.core.pass_contract import parse_pass
from rewrite.core.access_profile import AccessProfile, TableProfile
from rewrite.core.tracing import capture
from tests.pass_helpers import spec_error
from tests.helpers import (assert_exports, assert_roundtrip, ragged_batches, reference_bags, table_bags)
from tests.tolerances import assert_close

def hot_ids(rep: HotColdBag) -> np.ndarray:
    slots = rep.remap.to(torch.int64).numpy()
    hot = np.flatnonzero(slots >= 0)
    return hot[np.argsort(slots[hot])]


def test_exact_on_hot_rows_fp16_cold_within_bound(model, profile):
    rw, report = rewrite.apply(model, [passes.hot_cold(coverage=0.8, cold="fp16", tables=("t0",))], profile=profile)
    rep, table = rw.embeddings["t0"], model.embeddings["t0"]
    w = table.weight.detach()
    hot = hot_ids(rep)
    counts = profile.counts("t0")
    assert np.array_equal(hot, np.lexsort((np.arange(1000), -counts))[:len(hot)])   # hottest first
    assert counts[hot].sum() >= 0.8 * counts.sum() > counts[hot[:-1]].sum()
    assert torch.equal(rep.dense_rows(torch.from_numpy(hot)), w[torch.from_numpy(hot)])
    for batch in ragged_batches(model):
        idx, off = table_bags(batch, model, "t0")
        hot_only = torch.from_numpy(hot)[idx % len(hot)]             # same bag shapes, hot ids only
        assert torch.equal(rep(hot_only, off), table(hot_only, off))
        ref = w.clone()
        cold = torch.from_numpy(np.setdiff1d(np.arange(1000), hot))
        ref[cold] = w[cold].half().float()
        assert_close(rep(idx, off), reference_bags(ref, idx, off), "pooled-fp32", "hot fp32 / cold fp16")
    t = report.tables[0]
    assert t.status == "rewritten" and t.within_tolerance and t.tolerance.startswith("max |Δ| per id <= ")
    h, c = len(hot), 1000 - len(hot)
    assert rep.num_bytes() == h * 16 * 4 + 1000 * 2 + (c + 1) * 16 * 2      # hot fp32 + int16 remap + fp16 cold
    assert t.notes["hot_lookup_share"] == pytest.approx(counts[hot].sum() / counts.sum())
    capture(rw)[0].graph.lint()


def test_hot_bytes_budget_and_placement_in_spec(model, profile):
    cp = passes.hot_cold(hot_bytes="4KB", hot_memory="hbm", cold_memory="dram", cold="fp16", tables=("t0",))
    rw, _ = rewrite.apply(model, [cp], profile=profile)
    rep = rw.embeddings["t0"]
    assert rep.hot_rows == 4000 // 64 == 62
    spec = next(t for t in rw.full_spec()["tables"] if t["name"] == "t0")
    assert spec["kind"] == "hotcold" and spec["placement"] == {"hot": "hbm", "cold": "dram"}
    assert spec["cold"] == {"kind": "table", "rows": 939, "dim": 16, "pooling": "sum", "dtype": "float16"}
    assert "(hbm)" in rep.describe() and "(dram)" in rep.describe()


def test_nested_pass_runs_on_the_cold_table(model, profile):
    rw, report = rewrite.apply(model, [parse_pass("hot-cold:coverage=0.6:tables=t0:cold=tt:rank=4:cache_rows=1")],
                               profile=profile)
    rep, w = rw.embeddings["t0"], model.embeddings["t0"].weight.detach()
    hot = hot_ids(rep)
    assert isinstance(rep.cold, TTBag) and rep.cold.rows == 1000 - len(hot) + 1
    # the zero row takes every hot lookup, so it is the tt cache's one row and stays exact
    assert report.tables[0].notes["cold_zero_row_max_abs"] == 0.0
    assert report.tables[0].notes["cold_notes"]["ranks"] == [4, 4]
    assert torch.equal(rep.dense_rows(torch.from_numpy(hot)), w[torch.from_numpy(hot)])
    cold = np.setdiff1d(np.arange(1000), hot)
    assert_close(rep.dense_rows(torch.from_numpy(cold)), rep.cold.dense_rows(torch.arange(len(cold))), "exact",
                 "cold rows through the split vs the tt table")


def test_cold_sample_remaps_only_this_table(model):
    batch = ragged_batches(model, n=1)[0]
    to_cold = np.arange(1000)[::-1].copy()
    out = _cold_sample([batch], model, "t0", to_cold)[0]
    n0 = int(batch.offsets[batch.size])
    assert torch.equal(out.indices[:n0], torch.from_numpy(to_cold)[batch.indices[:n0]])
    assert torch.equal(out.indices[n0:], batch.indices[n0:]) and out.offsets is batch.offsets


def test_mean_pooling_roundtrip_and_export(model, profile, tmp_path):
    mean = model.with_tables({"t1": TableBag(300, 16, pooling="mean",
                                             weight=model.embeddings["t1"].weight.detach())})
    cps = [parse_pass("hot-cold:tables=t1:cold=prune-dims:keep=0.3"),
           parse_pass("hot-cold:tables=t0:coverage=0.5:cold=tt:rank=4:core_bits=8")]
    rw, report = rewrite.apply(mean, cps, profile=profile)
    rep = rw.embeddings["t1"]
    assert rep.pooling == "mean" and rep.cold.kind == "pruned"
    batch = ragged_batches(mean, n=1)[0]
    idx, off = table_bags(batch, mean, "t1")
    dense = rep.dense_rows(torch.arange(300)).detach().double()
    assert_close(rep(idx, off), reference_bags(dense, idx, off, "mean"), "pooled-fp32", "pruned cold, mean")
    loaded = assert_roundtrip(rw, tmp_path, batch)
    assert loaded.embeddings["t0"].describe() == rw.embeddings["t0"].describe()
    assert_exports(rw, batch)


def test_skip_reasons(model, profile):
    half = model.with_tables({"t2": TableBag(37, 16, dtype="float16",
                                             weight=model.embeddings["t2"].weight.detach())})
    silent = AccessProfile({**profile.tables, "t0": TableProfile("t0", 1000, 16, np.zeros(1000, np.int64))},
                           1, 1.0, "no lookups")
    cases = [
        (half, profile, passes.hot_cold(tables=("t2",)),
         "hot-cold rewrites fp32 plain tables, this is table 37x16 float16"),
        (model, None, passes.hot_cold(tables=("t0",)),
         "hot-cold needs an access profile to choose the hot rows (rewrite profile -o)"),
        (model, profile, passes.hot_cold(hot_bytes="32B", tables=("t0",)), "no hot rows: 32B holds no 64-byte row"),
        (model, silent, passes.hot_cold(tables=("t0",)), "no hot rows: the profile saw no lookup of this table"),
        (model, profile, passes.hot_cold(hot_bytes="1MB", tables=("t2",)), "every row is hot: nothing left for the cold part"),
        (model, profile, passes.hot_cold(cold="fp32", coverage=0.5, tables=("t0",)),
         "hot-cold takes 66064 bytes >= the table's 64000"),    # 12·64 + 1000·2 + 989·64
        (model, profile, parse_pass("hot-cold:coverage=0.5:tables=t0:cold=tt:min_rows=5000"),
         "cold pass tt:min_rows=5000 skipped the cold table: 989 rows < min_rows=5000"),
        (model, profile, parse_pass("hot-cold:coverage=0.5:tables=t0:cold=onehot"),
         "cold pass onehot skipped the cold table: 989 rows > max_rows=128"),
    ]
    for m, prof, cp, reason in cases:
        t = rewrite.apply(m, [cp], profile=prof)[1].tables[0]
        assert (t.status, t.reason) == ("skipped", reason)


@pytest.mark.parametrize("text, message", [
    ("hot-cold:coverage=0.5:hot_bytes=1MB", "give coverage or hot_bytes, not both"),
    ("hot-cold:coverage=0", "coverage must be in (0, 1], got 0.0"),
    ("hot-cold:hot_bytes=many", "hot_bytes: cannot read 'many' as a byte size (e.g. 512MB, 1.5GiB, 4096)"),
    ("hot-cold:hot_memory=", "hot_memory and cold_memory must be non-empty names"),
    ("hot-cold:cold=tt:rank=0", "cold=tt:rank=0: pass tt: rank entries must be >= 1"),
    ("hot-cold:cold=nosuch", "cold=nosuch: unknown pass 'nosuch' (known: "),
])
def test_config_errors(text, message):
    assert spec_error(text).startswith(f"pass hot-cold: {message}")


def test_grammar_nested_takes_the_rest():
    cp = parse_pass("hot-cold:coverage=0.8:cold=tt:rank=4:core_bits=8")
    assert cp.config.coverage == 0.8 and cp.config.cold == "tt:rank=4:core_bits=8"
    assert parse_pass(str(cp)) == cp


def test_representation_checks_its_cold_part():
    cold = {"kind": "table", "rows": 5, "dim": 4, "pooling": "sum", "dtype": "float16"}
    with pytest.raises(ValueError, match=r"cold part is 5x4, expected 8x4 \(cold rows \+ the zero row\)"):
        HotColdBag(10, 4, 3, cold)
    with pytest.raises(ValueError, match="cold part pools by sum, the table by mean"):
        HotColdBag(10, 4, 6, cold, pooling="mean")


def test_default_cold_part_is_int8_rowwise(model, profile):
    """The issue's default: hot rows fp32, cold rows FBGEMM row-wise int8 (within its bound)."""
    rw, report = rewrite.apply(model, [passes.hot_cold(coverage=0.8, tables=("t0",))], profile=profile)
    spec = next(t for t in rw.full_spec()["tables"] if t["name"] == "t0")
    assert spec["cold"]["kind"] == "rowwise" and spec["cold"]["bits"] == 8
    t = report.tables[0]
    assert t.status == "rewritten" and t.within_tolerance and t.tolerance.startswith("max |Δ| per id <= ")
