"""ROBE-Z: numerics against an independent reference, the closed-form least-squares fit, bytes,
skips, config errors, save/load, graph lint and export."""

import numpy as np
import pytest
import torch

import passes
import rewrite
from passes.universal_hash import reference_hash
from passes.robe import RobeBag, fit_robe
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.pass_manager import table_bags
from rewrite.training import table_dlrm
from rewrite.core.tracing import capture
from tests.hashed_helpers import export_bags, pooled_reference, ragged_batches, roundtrip, zipf_profile
from tests.tolerances import assert_close

torch.set_num_threads(1)
ROWS = [60, 500, 3, 1000]


@pytest.fixture(scope="module")
def model():
    return table_dlrm(ROWS, dim=8, seed=1)


@pytest.fixture(scope="module")
def rewritten(model):
    rw, report = rewrite.apply(model, [passes.robe(compression=4, block=4)], profile=zipf_profile(model))
    return rw, report


def reference_rows(rep: RobeBag, ids: np.ndarray) -> np.ndarray:
    """e(x) from the module docstring with Python big-int hashing."""
    arr = rep.array.detach().numpy().astype(np.float64)
    oa, ob = rep.offset_a.tolist(), rep.offset_b.tolist()
    out = np.zeros((len(ids), rep.dim))
    for n, x in enumerate(ids.tolist()):
        for c in range(rep.blocks):
            start = reference_hash(x, oa[c], ob[c], rep.size)
            sign = 1 - 2 * reference_hash(x, rep.sign_a[c].item(), rep.sign_b[c].item(), 2) if rep.signed else 1
            for t in range(rep.block):
                out[n, c * rep.block + t] = sign * arr[(start + t) % rep.size]
    return out


def test_matches_reference_on_ragged_empty_and_largest_index(model, rewritten):
    rw, _ = rewritten
    batches = ragged_batches(rw)
    for name in ("t0", "t1", "t3"):
        rep = rw.embeddings[name]
        assert isinstance(rep, RobeBag)
        for idx, off in table_bags(rw, batches, name):
            want = pooled_reference(lambda ids: reference_rows(rep, ids), idx, off)
            assert_close(rep(idx, off), want, "pooled-fp32", f"robe {name}")


def test_blocks_wrap_around_the_array_end():
    rep = RobeBag(rows=5000, dim=8, size=11, block=8, signed=False, seed=0)
    rep.array.data = torch.arange(11, dtype=torch.float32)
    ids = torch.arange(5000)
    start = rep.slots(ids)[:, 0, 0]
    wrapped = ids[start > 11 - 8]
    assert len(wrapped) > 0
    got = rep.dense_rows(wrapped).detach().numpy()
    np.testing.assert_array_equal(got, reference_rows(rep, wrapped.numpy()))


def test_fit_is_the_weighted_least_squares_optimum():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.standard_normal((40, 4)).astype(np.float32))
    weights = rng.uniform(0.1, 5.0, 40)
    rep = RobeBag(rows=40, dim=4, size=23, block=2, signed=True, seed=4)
    fit_robe(rep, target, weights)
    # independent: accumulate every (row, element) into its slot with Python loops
    num, den = np.zeros(23), np.zeros(23)
    for x in range(40):
        e = reference_rows(_unit(rep, x), np.array([x]))[0]    # sign * 1 at each element's slot
        slots = rep.slots(torch.tensor([x])).reshape(-1).tolist()
        for i, s in enumerate(slots):
            num[s] += weights[x] * e[i] * float(target[x, i])
            den[s] += weights[x]
    want = np.where(den > 0, num / np.maximum(den, 1e-30), 0.0)
    assert_close(rep.array, want, "weighted-mean-fit", "robe array vs per-slot weighted means")
    # and it is a stationary point of the weighted objective
    arr = rep.array.detach().clone().requires_grad_(True)
    rep.array = torch.nn.Parameter(arr)
    loss = (torch.as_tensor(weights, dtype=torch.float32) * ((rep.dense_rows(torch.arange(40)) - target) ** 2).sum(1)).sum()
    loss.backward()
    assert float(rep.array.grad.abs().max()) < 1e-4


def _unit(rep: RobeBag, x: int) -> RobeBag:
    u = RobeBag(rep.rows, rep.dim, rep.size, rep.block, rep.signed, rep.seed)
    u.array.data = torch.ones(rep.size)
    return u


def test_fit_favours_hot_rows(model):
    table = model.embeddings["t3"]
    weights = np.ones(table.rows)
    weights[:10] = 1000.0
    rep = RobeBag(table.rows, 8, size=800, block=4, seed=0)
    fit_robe(rep, table.weight.detach(), weights)
    err = (rep.dense_rows(torch.arange(table.rows)) - table.weight).detach().norm(dim=1)
    assert float(err[:10].mean()) < 0.3 * float(err[10:].mean())


def test_bytes_by_hand(rewritten):
    rw, report = rewritten
    rep = rw.embeddings["t3"]
    # array floats + offset (a, b) and sign (a, b) int64 per block + the int64 lane vector
    assert rep.num_bytes() == 4 * rep.size + 2 * 8 * 2 * (8 // 4) + 8 * 4
    assert rep.size == (1000 * 8 * 4 // 4 - (16 * 2 * 2 + 8 * 4)) // 4
    assert rep.bytes_per_lookup() == 32.0
    assert report.embedding_bytes_after == rw.embedding_bytes()


def test_skip_reasons(model, rewritten):
    _, report = rewritten
    by = {t.table: t for t in report.tables}
    assert by["t2"].status == "skipped"
    # compression=4: 24 bytes; one block of 4 floats + 2·2 hashes + the 4-lane vector take 16 + 64 + 32
    assert by["t2"].reason == ("robe's smallest form (an array of one block, 4 floats) takes 112 bytes; "
                               "compression=4 of this 96-byte table allows 24")
    _, rep = rewrite.apply(model, [passes.robe(size=1 << 20, tables=("t2",))])      # an explicit shape
    assert rep.tables[0].reason.startswith("robe would take") and "not fewer than the table's 96" in rep.tables[0].reason
    _, rep = rewrite.apply(model, [passes.robe(block=3)])
    assert rep.tables[0].reason == "block=3 does not divide the dimension 8"
    half = model.with_tables({"t0": TableBag(60, 8, dtype="float16", weight=model.embeddings["t0"].weight.detach())})
    _, rep = rewrite.apply(half, [passes.robe(compression=2, tables=("t0",))])
    assert rep.tables[0].reason == "robe fits fp32 plain tables, this is table 60x8 float16"
    one = table_dlrm([1, 50], dim=8)
    _, rep = rewrite.apply(one, [passes.robe(compression=2, tables=("t0",))])
    assert rep.tables[0].reason == "robe needs at least 2 rows, the table has 1"


@pytest.mark.parametrize("opts, message", [
    ({"compression": 0.5}, "compression must be >= 1, got 0.5"),
    ({"size": 0}, "size and block must be >= 1"),
    ({"max_error": -1}, "max_error must be >= 0, got -1"),
])
def test_config_errors(opts, message):
    with pytest.raises(RewriteError, match=f"pass robe: {message}"):
        passes.robe(**opts)


def test_max_error_is_enforced(model):
    _, rep = rewrite.apply(model, [passes.robe(compression=8, max_error=1e-3, tables=("t3",))])
    t = rep.tables[0]
    assert t.tolerance == "relative error <= 0.001" and not t.within_tolerance and t.rel_error > 1e-3


def test_roundtrip_lint_and_export(rewritten, tmp_path):
    rw, _ = rewritten
    back = roundtrip(rw, tmp_path)
    assert isinstance(back.embeddings["t1"], RobeBag)
    b = ragged_batches(rw, n=1)[0]
    assert torch.equal(back(*b.inputs()), rw(*b.inputs()))
    capture(rw)[0].graph.lint()
    ep = export_bags(rw, b)
    b2 = ragged_batches(rw, n=1, batch=17, seed=9)[0]
    from rewrite.core.batch import split_bags_np

    bags = [torch.from_numpy(a) for a in split_bags_np(b2.indices.numpy(), b2.offsets.numpy(), len(ROWS))]
    torch.testing.assert_close(ep.module()(b2.dense, *bags), rw(*b2.inputs()))
