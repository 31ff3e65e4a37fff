"""MP-Rec hybrid (hashed table part + DHE part, summed): numerics against an independent
reference, the two-step fit, sizing, bytes, skips, config errors, save/load, lint, export."""

import numpy as np
import pytest
import torch
from torch import nn

import passes
import rewrite
from passes.dhe import decoder_bytes
from passes.universal_hash import reference_hash
from passes.hybrid import HybridBag, HybridConfig, fit_slot_table, plan_hybrid
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.pass_manager import table_bags
from rewrite.training import table_dlrm
from rewrite.core.tracing import capture
from tests.hashed_helpers import export_bags, pooled_reference, ragged_batches, roundtrip, zipf_profile
from tests.passes.test_dhe import reference_rows as dhe_reference
from tests.tolerances import assert_close

torch.set_num_threads(1)
ROWS = [90, 900, 3]


@pytest.fixture(scope="module")
def model():
    return table_dlrm(ROWS, dim=8, seed=3)


@pytest.fixture(scope="module")
def rewritten(model):
    cfg = passes.hybrid(slots=64, k=12, hidden=(16, 8), steps=60, batch_size=256, tables=("t0", "t1"))
    return rewrite.apply(model, [cfg], profile=zipf_profile(model))


def reference_rows(rep: HybridBag, ids: np.ndarray) -> np.ndarray:
    a, b = rep.slot_a.item(), rep.slot_b.item()
    t = rep.weight.detach().double().numpy()
    slots = [reference_hash(int(x), a, b, rep.slots) for x in ids]
    return t[slots] + dhe_reference(rep.decoder, ids)


def test_matches_reference_on_ragged_empty_and_largest_index(model):
    rep = HybridBag(900, 8, slots=50, k=10, hidden=(12, 6), seed=1)
    for p in rep.parameters():
        nn.init.normal_(p, std=0.5)
    m = model.with_tables({"t1": rep})
    for idx, off in table_bags(m, ragged_batches(m), "t1"):
        want = pooled_reference(lambda ids: reference_rows(rep, ids), idx, off)
        assert_close(rep(idx, off), want, "decoder-mlp", "hybrid")


def test_table_part_is_the_weighted_mean_per_slot(model):
    target = model.embeddings["t1"].weight.detach()
    weights = np.random.default_rng(0).uniform(0.5, 3.0, 900)
    rep = HybridBag(900, 8, slots=37, k=4, hidden=(4, 2), seed=0)
    fit_slot_table(rep, target, weights)
    a, b = rep.slot_a.item(), rep.slot_b.item()
    num, den = np.zeros((37, 8)), np.zeros(37)
    for x in range(900):
        s = reference_hash(x, a, b, 37)
        num[s] += weights[x] * target[x].double().numpy()
        den[s] += weights[x]
    want = np.where(den[:, None] > 0, num / np.maximum(den, 1e-30)[:, None], 0.0)
    assert_close(rep.weight, want, "weighted-mean-fit", "hybrid slots vs per-slot weighted means")


def test_dhe_part_reduces_the_table_part_error(rewritten):
    _, report = rewritten
    notes = report.tables[1].notes
    assert notes["fit_weighted_rel_error"] < notes["table_part_rel_error"]


def test_plan_splits_the_budget():
    cfg = HybridConfig(compression=4.0, table_share=0.5)
    slots, k, hidden = plan_hybrid(900, 8, cfg)
    budget = 900 * 8 * 4 // 4
    assert slots == int(budget * 0.5) // 32
    assert slots * 32 + 16 + decoder_bytes(8, k, hidden) <= budget


def test_bytes_by_hand(rewritten):
    rw, _ = rewritten
    rep = rw.embeddings["t1"]
    dec = 4 * (12 * 16 + 16 + 16 * 8 + 8 + 8 * 8 + 8) + 16 * 12
    assert rep.num_bytes() == 64 * 8 * 4 + 16 + dec
    assert rep.bytes_per_lookup() == 8 * 4 + dec - 16 * 12


def test_skip_reasons(model):
    _, rep = rewrite.apply(model, [passes.hybrid(steps=1, slots=4096, tables=("t2",))])   # an explicit shape
    assert rep.tables[0].reason.startswith("hybrid would take") and rep.tables[0].reason.endswith("table's 96")
    # the default, compression 8: one slot (8·4 + 16 hash bytes) + the smallest decoder (408 bytes)
    _, rep = rewrite.apply(model, [passes.hybrid(tables=("t2",))])
    assert rep.tables[0].reason == ("hybrid's smallest form (1 slot + dhe k=8, hidden 4-2) takes 456 bytes; "
                                    "compression=8 of this 96-byte table allows 12")
    half = model.with_tables({"t0": TableBag(90, 8, dtype="bfloat16", weight=model.embeddings["t0"].weight.detach())})
    _, rep = rewrite.apply(half, [passes.hybrid(compression=2, tables=("t0",))])
    assert rep.tables[0].reason == "hybrid fits fp32 plain tables, this is table 90x8 bfloat16"
    one = table_dlrm([1, 50], dim=8)
    _, rep = rewrite.apply(one, [passes.hybrid(compression=2, tables=("t0",))])
    assert rep.tables[0].reason == "hybrid needs at least 2 rows, the table has 1"


@pytest.mark.parametrize("opts, message", [
    ({"table_share": 1.0}, "table_share must be in \\(0, 1\\), got 1.0"),
    ({"slots": 0}, "slots, k and hidden widths must be >= 1"),
    ({"compression": 0.9}, "compression must be >= 1, got 0.9"),
    ({"buckets": 1}, "buckets must be in \\[2, 16777216\\], got 1"),
    ({"batch_size": 0}, "steps must be >= 0 and batch_size >= 1"),
])
def test_config_errors(opts, message):
    with pytest.raises(RewriteError, match=f"pass hybrid: {message}"):
        passes.hybrid(**opts)


def test_roundtrip_lint_and_export(rewritten, tmp_path):
    rw, _ = rewritten
    back = roundtrip(rw, tmp_path)
    assert isinstance(back.embeddings["t1"], HybridBag)
    b = ragged_batches(rw, n=1)[0]
    assert torch.equal(back(*b.inputs()), rw(*b.inputs()))
    capture(rw)[0].graph.lint()
    export_bags(rw, b)
