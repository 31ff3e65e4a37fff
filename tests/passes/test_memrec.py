"""MEM-REC: numerics against an independent reference (per-token and shared weights), the
closed-form start and the fit, sizing, bytes, skips, config errors, save/load, lint, export."""

import numpy as np
import pytest
import torch
from torch import nn

import passes
import rewrite
from passes.universal_hash import reference_hash
from passes.memrec import MemRecBag, MemRecConfig, init_memrec, memrec_bytes, plan_memrec
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.pass_manager import table_bags
from rewrite.training import table_dlrm
from rewrite.core.tracing import capture
from tests.hashed_helpers import export_bags, pooled_reference, ragged_batches, roundtrip, zipf_profile
from tests.tolerances import assert_close

torch.set_num_threads(1)
ROWS = [120, 1500, 4]


@pytest.fixture(scope="module")
def model():
    return table_dlrm(ROWS, dim=8, seed=4)


@pytest.fixture(scope="module")
def rewritten(model):
    cfg = passes.memrec(compression=4, k=3, kw=2, steps=150, batch_size=256, lr=1e-2, tables=("t0", "t1"))
    return rewrite.apply(model, [cfg], profile=zipf_profile(model))


def reference_rows(rep: MemRecBag, ids: np.ndarray) -> np.ndarray:
    t = rep.token_table.detach().double().numpy()
    v = rep.weight_table.detach().double().numpy()
    out = np.zeros((len(ids), rep.dim))
    for n, x in enumerate(ids.tolist()):
        alpha = sum(v[reference_hash(x, rep.weight_a[i].item(), rep.weight_b[i].item(), rep.weight_rows)]
                    for i in range(rep.kw))
        for j in range(rep.k):
            row = t[reference_hash(x, rep.token_a[j].item(), rep.token_b[j].item(), rep.tokens)]
            out[n] += (alpha[j] if rep.per_token_weights else alpha[0]) * row
    return out


@pytest.mark.parametrize("per_token", [True, False])
def test_matches_reference_on_ragged_empty_and_largest_index(model, per_token):
    rep = MemRecBag(1500, 8, tokens=97, k=3, weight_rows=13, kw=2, per_token_weights=per_token, seed=2)
    for p in rep.parameters():
        nn.init.normal_(p)
    assert rep.weight_table.shape == (13, 3 if per_token else 1)
    m = model.with_tables({"t1": rep})
    for idx, off in table_bags(m, ragged_batches(m), "t1"):
        want = pooled_reference(lambda ids: reference_rows(rep, ids), idx, off)
        assert_close(rep(idx, off), want, "float32", f"memrec per_token={per_token}")


def test_initial_state_is_the_weighted_mean_over_k(model):
    target = model.embeddings["t0"].weight.detach()
    weights = np.random.default_rng(1).uniform(0.5, 2.0, 120)
    rep = MemRecBag(120, 8, tokens=31, k=2, weight_rows=5, kw=2, seed=0)
    init_memrec(rep, target, weights)
    assert torch.allclose(rep.weight_table, torch.full((5, 2), 0.5))
    num, den = np.zeros((31, 8)), np.zeros(31)
    for x in range(120):
        for j in range(2):
            s = reference_hash(x, rep.token_a[j].item(), rep.token_b[j].item(), 31)
            num[s] += weights[x] * target[x].double().numpy()
            den[s] += weights[x]
    want = np.where(den[:, None] > 0, num / np.maximum(den, 1e-30)[:, None], 0.0) / 2
    assert_close(rep.token_table, want, "weighted-mean-fit", "memrec tokens vs per-token weighted means")


def test_fit_improves_on_the_closed_form_start(rewritten):
    _, report = rewritten
    notes = report.tables[1].notes
    assert notes["fit_weighted_rel_error"] < 0.9 * notes["init_rel_error"]


def test_plan_respects_the_budget():
    cfg = MemRecConfig(compression=4.0, k=3, kw=2, weight_share=0.1)
    tokens, wrows = plan_memrec(1500, 8, cfg)
    assert memrec_bytes(8, tokens, 3, wrows, 2, True) <= 1500 * 8 * 4 // 4
    assert memrec_bytes(8, tokens + 1, 3, wrows, 2, True) > 1500 * 8 * 4 // 4


def test_bytes_by_hand(rewritten):
    rw, _ = rewritten
    rep = rw.embeddings["t1"]
    assert rep.num_bytes() == 4 * (rep.tokens * 8 + rep.weight_rows * 3) + 8 * 2 * (3 + 2)
    assert rep.bytes_per_lookup() == 4 * (3 * 8 + 2 * 3)


def test_skip_reasons(model):
    _, rep = rewrite.apply(model, [passes.memrec(steps=1, tokens=4096, tables=("t2",))])   # an explicit shape
    assert rep.tables[0].reason.startswith("memrec would take") and rep.tables[0].reason.endswith("table's 128")
    # the default, compression 8: 4·(8 + 2) + 16·(2 + 2) bytes for one token row and one weight row
    _, rep = rewrite.apply(model, [passes.memrec(tables=("t2",))])
    assert rep.tables[0].reason == ("memrec's smallest form (1 token row, 1 weight row) takes 104 bytes; "
                                    "compression=8 of this 128-byte table allows 16")
    half = model.with_tables({"t0": TableBag(120, 8, dtype="float16", weight=model.embeddings["t0"].weight.detach())})
    _, rep = rewrite.apply(half, [passes.memrec(compression=2, tables=("t0",))])
    assert rep.tables[0].reason == "memrec fits fp32 plain tables, this is table 120x8 float16"
    one = table_dlrm([1, 50], dim=8)
    _, rep = rewrite.apply(one, [passes.memrec(compression=2, tables=("t0",))])
    assert rep.tables[0].reason == "memrec needs at least 2 rows, the table has 1"


@pytest.mark.parametrize("opts, message", [
    ({"k": 0}, "tokens, k, weight_rows and kw must be >= 1"),
    ({"weight_share": 0}, "weight_share must be in \\(0, 1\\), got 0"),
    ({"compression": 0.1}, "compression must be >= 1, got 0.1"),
    ({"per_token_weights": "maybe"}, "option per_token_weights='maybe': must be true or false"),
])
def test_config_errors(opts, message):
    with pytest.raises(RewriteError, match=f"pass memrec: {message}"):
        passes.memrec(**opts)


def test_roundtrip_lint_and_export(rewritten, tmp_path):
    rw, _ = rewritten
    back = roundtrip(rw, tmp_path)
    assert isinstance(back.embeddings["t1"], MemRecBag)
    b = ragged_batches(rw, n=1)[0]
    assert torch.equal(back(*b.inputs()), rw(*b.inputs()))
    capture(rw)[0].graph.lint()
    export_bags(rw, b)
