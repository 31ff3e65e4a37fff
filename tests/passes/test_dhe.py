"""Deep Hash Embedding: numerics against an independent numpy reference (both transforms),
batch-norm folding, the frequency-weighted fit, sizing, bytes, skips, config errors,
save/load, graph lint and export."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import passes
import rewrite
from passes.dhe import DHEBag, DeepHashDecoder, decoder_bytes, fit_decoder, fold_batchnorm, mish, plan_decoder
from passes.universal_hash import reference_hash
from passes.rowfit import table_rows, weighted_rel_error
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.pass_manager import table_bags
from rewrite.training import table_dlrm
from rewrite.core.tracing import capture
from tests.hashed_helpers import export_bags, pooled_reference, ragged_batches, roundtrip, zipf_profile
from tests.tolerances import assert_close

torch.set_num_threads(1)
ROWS = [80, 700, 2]


@pytest.fixture(scope="module")
def model():
    return table_dlrm(ROWS, dim=8, seed=2)


@pytest.fixture(scope="module")
def rewritten(model):
    cfg = passes.dhe(k=12, hidden=(16, 8), steps=60, batch_size=256, tables=("t0", "t1"))
    return rewrite.apply(model, [cfg], profile=zipf_profile(model))


def reference_rows(dec: DeepHashDecoder, ids: np.ndarray) -> np.ndarray:
    """code -> Linear/Mish layers in float64 numpy, hashes with Python big integers."""
    a, b, m = dec.hash_a.tolist(), dec.hash_b.tolist(), dec.buckets
    h = np.array([[reference_hash(int(x), a[j], b[j], m) for j in range(dec.k)] for x in ids], dtype=np.float64)
    if dec.transform == "uniform":
        x = h * 2 / (m - 1) - 1
    else:
        u = (h + 0.5) / m
        u1, u2 = u[:, 0::2], u[:, 1::2]
        r = np.sqrt(-2 * np.log(u1))
        x = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)], axis=1)
    for i, layer in enumerate(dec.layers):
        x = x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        if i < len(dec.layers) - 1:
            x = x * np.tanh(np.log1p(np.exp(x)))
    return x


@pytest.mark.parametrize("transform", ["uniform", "gaussian"])
def test_matches_reference_on_ragged_empty_and_largest_index(model, transform):
    rep = DHEBag(700, 8, k=10, hidden=(12, 6), transform=transform, seed=3)
    for p in rep.parameters():
        nn.init.normal_(p, std=0.5)
    tables = model.with_tables({"t1": rep})
    for idx, off in table_bags(tables, ragged_batches(tables), "t1"):
        want = pooled_reference(lambda ids: reference_rows(rep.decoder, ids), idx, off)
        assert_close(rep(idx, off), want, "decoder-mlp", f"dhe {transform}")


def test_gaussian_code_is_standard_normal():
    dec = DeepHashDecoder(4, k=64, buckets=1_000_000, hidden=(4,), transform="gaussian", seed=0)
    code = dec.encode(torch.arange(5000)).numpy().ravel()
    assert abs(code.mean()) < 0.02 and abs(code.std() - 1) < 0.02


def test_mish_matches_definition():
    z = torch.linspace(-30, 30, 601, dtype=torch.float64)
    torch.testing.assert_close(mish(z), z * torch.tanh(torch.nn.functional.softplus(z)))


def test_batchnorm_folding_is_exact():
    dec = DeepHashDecoder(8, k=10, buckets=1000, hidden=(12, 6), transform="uniform", seed=0)
    norms = nn.ModuleList(nn.BatchNorm1d(h) for h in dec.hidden)
    for bn in norms:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    norms.eval()
    ids = torch.arange(300)
    with torch.no_grad():
        x = dec.encode(ids)
        for layer, bn in zip(dec.layers[:-1], norms):
            x = mish(bn(layer(x)))
        want = dec.layers[-1](x)
        fold_batchnorm(dec, norms)
        assert_close(dec(ids), want, "float32", "batchnorm folded vs applied")
    assert not any(isinstance(m, nn.BatchNorm1d) for m in dec.modules())


def test_fit_reduces_error_and_favours_hot_rows():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.standard_normal((300, 4)).astype(np.float32)) * 0.1
    weights = np.ones(300)
    weights[:10] = 200.0
    w = torch.as_tensor(weights, dtype=torch.float32)
    dec = DeepHashDecoder(4, k=16, buckets=10_000, hidden=(32, 16), transform="uniform", seed=0)
    before = weighted_rel_error(dec(torch.arange(300)).detach(), target, w)
    fit_decoder(dec, target, weights, steps=300, batch_size=128, lr=1e-2, seed=0, desc="test")
    rows = dec(torch.arange(300)).detach()
    after = weighted_rel_error(rows, target, w)
    assert after < 0.6 and after < 0.7 * before
    err = (rows - target).norm(dim=1)
    assert float(err[:10].mean()) < 0.5 * float(err[10:].mean())


def test_fit_is_seeded():
    target = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for _ in range(2):
        dec = DeepHashDecoder(4, k=8, buckets=1000, hidden=(8, 4), transform="uniform", seed=0)
        torch.manual_seed(0)
        dec.layers.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        fit_decoder(dec, target, np.ones(50), steps=20, batch_size=16, lr=1e-2, seed=5, desc="test")
        outs.append(dec(torch.arange(50)).detach())
    assert torch.equal(outs[0], outs[1])


def test_default_sizes_every_table_by_compression_8_with_steps_by_rows(model):
    """2, 80 and 700 rows at the defaults: the two small tables cannot hold a decoder in 1/8 of
    their bytes (skipped with the reason), the 700-row one gets the largest decoder in 2800 bytes
    and auto_steps(700, 2048) = 300 steps."""
    rw, report = rewrite.apply(model, [passes.dhe(batch_size=256)])
    status = {t.table: t.status for t in report.tables}
    assert status == {"t0": "skipped", "t1": "rewritten", "t2": "skipped"}
    t1 = next(t for t in report.tables if t.table == "t1")
    assert t1.bytes_after <= 700 * 8 * 4 // 8
    assert (t1.notes["k"], t1.notes["hidden"]) == (plan_decoder(8, 2800)[0], list(plan_decoder(8, 2800)[1]))
    assert t1.notes["steps"] == 300   # 6 · 700 / 256 = 16.4 steps: the floor, MIN_STEPS


def test_plan_fits_the_budget():
    for budget in (2_000, 20_000, 200_000):
        k, hidden = plan_decoder(16, budget)
        assert k == 2 * hidden[0] and hidden[1] == hidden[0] // 2
        assert decoder_bytes(16, k, hidden) <= budget
        h = hidden[0] + 2
        assert decoder_bytes(16, 2 * h, (h, h // 2)) > budget
    assert plan_decoder(16, decoder_bytes(16, 8, (4, 2)) - 1) is None


def test_bytes_by_hand_and_counts(rewritten):
    rw, report = rewritten
    rep = rw.embeddings["t1"]
    weights = 4 * (12 * 16 + 16 + 16 * 8 + 8 + 8 * 8 + 8)
    assert rep.num_bytes() == weights + 2 * 8 * 12 == decoder_bytes(8, 12, (16, 8))
    assert rep.bytes_per_lookup() == weights
    mlp = 2 * (12 * 16 + 16 * 8 + 8 * 8) + 16 + 8 + 8
    assert rep.flops_per_lookup() == (1 + 4 * 12) + 2 * 12 + mlp + 7 * 24 + 8
    assert {t.table: t.status for t in report.tables} == {"t0": "rewritten", "t1": "rewritten"}
    assert report.tables[1].notes["fit_weighted_rel_error"] < 1.0


def test_compression_knob_sizes_the_decoder(model):
    rw, report = rewrite.apply(model, [passes.dhe(compression=2, steps=5, tables=("t1",))])
    assert rw.embeddings["t1"].num_bytes() <= 700 * 8 * 4 / 2
    assert report.tables[0].notes["k"] == plan_decoder(8, 700 * 8 * 4 // 2)[0]


def test_skip_reasons(model):
    _, rep = rewrite.apply(model, [passes.dhe(k=1024, steps=1, tables=("t0",))])   # an explicit, huge shape
    assert rep.tables[0].reason.startswith("dhe would take") and "not fewer than the table's 2560" in rep.tables[0].reason
    # the default (compression 8): 2560 / 8 = 320 bytes < the smallest decoder, 4·(8·4+4 + 4·2+2 + 2·8+8) + 16·8
    _, rep = rewrite.apply(model, [passes.dhe(tables=("t0",))])
    assert rep.tables[0].reason == ("dhe's smallest form (k=8, hidden 4-2) takes 408 bytes; "
                                    "compression=8 of this 2560-byte table allows 320")
    _, rep = rewrite.apply(model, [passes.dhe(steps=1, compression=2, tables=("t2",))])
    assert rep.tables[0].reason.endswith("compression=2 of this 64-byte table allows 32")
    half = model.with_tables({"t0": TableBag(80, 8, dtype="float16", weight=model.embeddings["t0"].weight.detach())})
    _, rep = rewrite.apply(half, [passes.dhe(compression=2, tables=("t0",))])
    assert rep.tables[0].reason == "dhe fits fp32 plain tables, this is table 80x8 float16"
    one = table_dlrm([1, 50], dim=8)
    _, rep = rewrite.apply(one, [passes.dhe(compression=2, tables=("t0",))])
    assert rep.tables[0].reason == "dhe needs at least 2 rows, the table has 1"


@pytest.mark.parametrize("opts, message", [
    ({"compression": 0}, "compression must be >= 1, got 0"),
    ({"steps": -1}, "steps must be >= 0 and batch_size >= 1"),
    ({"lr": 0}, "lr must be > 0, got 0"),
    ({"k": 0}, "k and hidden widths must be >= 1"),
    ({"hidden": "8,0"}, "k and hidden widths must be >= 1"),
    ({"k": 7, "transform": "gaussian"}, "the gaussian transform pairs hashes: k must be even, got 7"),
    ({"buckets": 2**25}, "buckets must be in \\[2, 16777216\\], got 33554432"),
    ({"transform": "laplace"}, "option transform='laplace': must be one of uniform, gaussian"),
    ({"compression": 4, "k": 16}, "give compression or an explicit shape \\(k, hidden\\), not both"),
])
def test_config_errors(opts, message):
    with pytest.raises(RewriteError, match=f"pass dhe: {message}"):
        passes.dhe(**opts)


def test_roundtrip_lint_and_export(rewritten, tmp_path):
    rw, _ = rewritten
    back = roundtrip(rw, tmp_path)
    assert isinstance(back.embeddings["t0"], DHEBag)
    b = ragged_batches(rw, n=1)[0]
    assert torch.equal(back(*b.inputs()), rw(*b.inputs()))
    capture(rw)[0].graph.lint()
    export_bags(rw, b)
    rows = table_rows(back.embeddings["t1"], 700)
    assert rows.shape == (700, 8) and torch.isfinite(rows).all()
