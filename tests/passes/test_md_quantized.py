"""mdq: packing, exact bytes, the fit's error bound, sizing by compression, skips, option errors,
round trip / export, and quantization-aware recovery that returns the stored form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import passes
import rewrite
from passes.md_quantized import MDQBag, MDQTraining, fit_grid, mdq_bytes, pack, split_values, unpack
from passes.mixed_dim import fit_md
from rewrite import data
from rewrite.core.embedding import TableBag
from rewrite.pass_manager import apply
from rewrite.recovery import recover
from rewrite.training import evaluate
from tests.pass_helpers import assert_exports, batches, small_model, with_table, spec_error
from tests.tolerances import assert_close

torch.set_num_threads(1)


def low_rank(rows: int, dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, dim, generator=g) * 0.2


@pytest.mark.parametrize("bits, inner", [(8, 3), (4, 5), (2, 7), (4, 1)])
def test_pack_unpack_round_trip(bits, inner):
    q = torch.randint(0, 2 ** bits, (37, inner))
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (37, -(-inner * bits // 8))
    assert torch.equal(unpack(packed, inner, bits), q.to(torch.float32))


@pytest.mark.parametrize("bits, inner", [(8, 4), (4, 3), (2, 8), (4, 8), (4, 1), (2, 2), (2, 1), (2, 3)])
def test_exact_bytes_and_per_column_error_bound(bits, inner):
    w = low_rank(1000, 8, 8, seed=bits)
    model = with_table(small_model(), "t3", w)
    rw, report = apply(model, [passes.mdq(bits=bits, inner_dim=inner, tables=("t3",))])
    rep = rw.embeddings["t3"]
    assert isinstance(rep, MDQBag) and rep.inner_dim == inner and rep.projected == (inner < 8)
    assert rep.num_bytes() == mdq_bytes(1000, 8, inner, bits) == report.tables[0].bytes_after
    per_row = {2: 1 / 4, 4: 1 / 2}.get(inner * bits, -(-inner * bits // 8))  # rows share a byte
    assert mdq_bytes(1000, 8, inner, bits) == int(1000 * per_row) + 4 * inner + (16 * inner if inner < 8 else 0)
    # E's rows are within half a step of the fp32 factor clipped to the fitted range (fp16 scale /
    # bias rounding included), and the range fits E no worse than min / max does
    ids = torch.arange(1000)
    e = fit_md(w, np.ones(1000), inner).weight.detach() if inner < 8 else w     # no profile: uniform weights
    got = rep.factor(ids)
    step, lo = rep.scale.float(), rep.bias.float()
    clipped = torch.minimum(torch.maximum(e, lo), lo + step * (2 ** bits - 1))
    assert bool(((got - clipped).abs() <= step / 2 + 1e-3 * step + 1e-6).all())
    minmax = MDQBag.from_factor(e, None, inner, bits).factor(ids)
    assert float(((got - e) ** 2).sum()) <= float(((minmax - e) ** 2).sum()) * (1 + 1e-3) + 1e-9


@pytest.mark.parametrize("bits", [2, 4])
def test_range_fit_clips_rare_outliers_and_never_loses_to_min_max(bits):
    """A few rare extreme rows set min / max's step for every row; the weighted fit cuts them."""
    g = torch.Generator().manual_seed(bits)
    e = torch.cat([torch.randn(2000, 3, generator=g), 12 * torch.randn(10, 3, generator=g)])
    w = np.r_[np.full(2000, 10.0), np.ones(10)]                # the outliers are rarely looked up
    c, s = fit_grid(e, w, bits)
    levels = 2 ** bits - 1

    def err(c, s):
        q = torch.clamp(torch.round((e - c) / s), 0, levels)
        return (torch.from_numpy(w).float().unsqueeze(1) * (e - c - s * q) ** 2).sum(0)

    lo, hi = e.min(0).values, e.max(0).values
    fitted, minmax = err(c, s), err(lo, (hi - lo) / levels)
    assert bool((fitted <= minmax).all())
    assert float(fitted.sum()) < 0.5 * float(minmax.sum())      # measured 0.03 (int2), 0.13 (int4)
    assert bool((c > lo).all()) and bool((c + levels * s < hi).all())


@pytest.mark.parametrize("inner, bits", [(1, 4), (2, 2), (1, 2)])
def test_rows_sharing_a_byte_decode_every_row(inner, bits):
    q = torch.randint(0, 2 ** bits, (103, inner))
    rep = MDQBag(103, 8, inner, bits)
    assert rep.codes.shape == (-(-103 * inner * bits // 8), 1)
    rep.codes.copy_(pack(q, bits, rep.per_byte))
    rep.scale.fill_(1.0)
    ids = torch.tensor([0, 102, 5, 5, 64, 1, 2, 3])
    assert torch.equal(rep.factor(ids), q[ids].to(torch.float32))
    assert torch.equal(split_values(torch.tensor([[27.0]]), 3, 2), torch.tensor([[[3.0, 2.0, 1.0]]]))


def test_full_dim_int8_is_close_to_the_table_and_low_rank_is_exact_up_to_rounding():
    w = low_rank(1000, 8, 8)
    model = with_table(small_model(), "t3", w)
    rw, report = apply(model, [passes.mdq(bits=8, energy=1.0, tables=("t3",))])
    assert rw.embeddings["t3"].inner_dim == 8 and rw.embeddings["t3"].proj is None
    ref = TableBag(1000, 8, weight=w)
    for b in batches(small_model(rows=(1000,)), n=2, mean_len=3.0):
        got, want = rw.embeddings["t3"](b.indices, b.offsets), ref(b.indices, b.offsets)
        assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())
    model = with_table(small_model(), "t3", low_rank(1000, 8, 2))
    rw2, _ = apply(model, [passes.mdq(bits=8, energy=0.9999, tables=("t3",))])   # rank 2 found, projected
    assert rw2.embeddings["t3"].inner_dim == 2 and rw2.embeddings["t3"].projected


@pytest.mark.parametrize("ratio", [4.0, 16.0, 50.0])
def test_compression_is_met_on_every_table_or_skipped_with_the_reason(ratio):
    model = small_model(rows=(2, 3, 24, 305, 2000), dim=16)
    _, report = apply(model, [passes.mdq(compression=ratio)])
    for t in report.tables:
        if t.status == "rewritten":
            assert t.bytes_after * ratio <= t.bytes_before, t
        else:
            assert t.reason.startswith("mdq's smallest int4 form (r = 1) takes"), t.reason
    big = next(t for t in report.tables if t.table == "t4")
    assert big.status == "rewritten"                  # 2,000 x 16: r = 1 int4 is 1,036 B (124x)
    tiny = next(t for t in report.tables if t.table == "t0")
    assert tiny.status == "skipped" and "r = 1) takes 37 bytes" in tiny.reason


def test_skip_reasons_and_selection():
    model = small_model(rows=(3, 40, 257, 1000))
    model = model.with_tables({"t2": TableBag(257, 8, dtype="float16", weight=model.embeddings["t2"].weight)})
    _, report = apply(model, [passes.mdq(bits=8, inner_dim=8, min_rows=10)])
    reasons = {t.table: t.reason for t in report.tables}
    assert reasons["t0"] == "3 rows < min_rows=10"
    assert reasons["t2"] == "mdq rewrites fp32 plain tables, this is table 257x8 float16"
    assert report.tables[1].status == "rewritten"      # 40 x 8 int8 full dim: 352 B < 1,280 B
    # 1 row x 8: codes 8 B + scale/bias 32 B is more than the 32-byte table
    _, one = apply(small_model(rows=(1,)), [passes.mdq(bits=8, inner_dim=8)])
    assert one.tables[0].reason == ("inner_dim 8 gives r=8, whose int8 mdq form (40 B) is not smaller "
                                    "than the table (32 B)")


@pytest.mark.parametrize("spec, message", [
    ("mdq:bits=3", "bits must be one of 8, 4, 2 (got 3)"),
    ("mdq:energy=0", "energy must be in (0, 1], got 0.0"),
    ("mdq:inner_dim=0", "inner_dim must be >= 1, got 0"),
    ("mdq:compression=1", "compression must be > 1, got 1.0"),
    ("mdq:compression=8:inner_dim=2", "compression sizes inner_dim itself: give one of them"),
])
def test_config_validation(spec, message):
    error = spec_error(spec)
    assert message in error and error.startswith("pass mdq:")
    assert "\n" not in error


def test_round_trip_lint_and_export(tmp_path):
    model = small_model()
    rw, _ = apply(model, [passes.mdq(bits=4, inner_dim=3, min_rows=100), passes.mdq(bits=8, energy=1.0)])
    assert rw.embeddings["t3"].kind == "mdq" and rw.embeddings["t0"].kind == "mdq"
    rewrite.save(rw, tmp_path / "mdq.safetensors")
    back = rewrite.load(tmp_path / "mdq.safetensors")
    for k, v in rw.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ex, check = batches(model, n=2, seed=9)
    assert torch.equal(back(*check.inputs()), rw(*check.inputs()))
    rewrite.capture(rw)[0].graph.lint()
    assert_exports(rw, ex, check)


def test_training_form_computes_the_stored_numbers():
    model = with_table(small_model(), "t3", low_rank(1000, 8, 4))
    rw, _ = apply(model, [passes.mdq(bits=4, inner_dim=3, tables=("t3",))])
    stored = rw.embeddings["t3"]
    train = stored.training_form()
    assert isinstance(train, MDQTraining) and train.weight.dtype == torch.float32
    with torch.no_grad():
        train.weight.add_(0.01 * torch.randn_like(train.weight))     # off the grid: the forward rounds
    back = train.stored_form()
    for b in batches(small_model(rows=(1000,)), n=2, mean_len=3.0):
        assert_close(train(b.indices, b.offsets), back(b.indices, b.offsets), "float32")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from rewrite.core.synthetic import Synthetic, SyntheticConfig, write_npz
    from rewrite.training import table_dlrm, train

    d = tmp_path_factory.mktemp("mdq")
    gen = Synthetic(SyntheticConfig(rows=(60, 400, 300, 8), n_pairs=4, seed=1, structure="lowrank"))
    write_npz(d / "day_0.npz", *gen.sample(8000, seed=0))
    write_npz(d / "day_1.npz", *gen.sample(4000, seed=1))
    day0, day1 = data.open(d / "day_0.npz"), data.open(d / "day_1.npz")
    teacher = train(table_dlrm([60, 400, 300, 8], dim=8, seed=0), day0, epochs=2, lr=1e-2)
    return teacher, day0, day1


def test_recovery_trains_the_codes_and_returns_the_stored_form(world):
    teacher, day0, day1 = world
    prof = rewrite.profile(teacher, day0)
    student, _ = apply(teacher, [passes.mdq(bits=2, inner_dim=2, min_rows=100)], profile=prof)
    rec, report = recover(teacher, student, day0, steps=200, lr=1e-1, eval_data=day1)   # mdq trains at lr / 10
    assert report.tables == ["t1", "t2"] and report.frozen == []      # codes train through fp32 masters
    for t in ("t1", "t2"):
        assert isinstance(rec.embeddings[t], MDQBag)
        assert rec.embeddings[t].num_bytes() == student.embeddings[t].num_bytes()
        assert not torch.equal(rec.embeddings[t].codes, student.embeddings[t].codes)
    # the report measured the stored form: its AUC is what evaluate() sees on the returned model
    assert report.eval["auc_recovered"] == pytest.approx(evaluate(rec, day1).auc, abs=1e-9)
    # measured: logit RMSE 0.216 -> 0.193, AUC 0.7201 -> 0.7231 (with min / max ranges, before the
    # weighted range fit: 0.7145 -> 0.7206)
    assert report.eval["logit_rmse_recovered"] < 0.95 * report.eval["logit_rmse_rewritten"]
    assert report.eval["auc_recovered"] > report.eval["auc_rewritten"] + 0.002


def test_range_fit_of_a_table_larger_than_the_sample_uses_its_full_span():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5000, 2, generator=g)
    w = np.ones(5000)
    c, s = fit_grid(e, w, 4, max_rows=1000)             # fitted on 1,000 sampled rows
    c_all, s_all = fit_grid(e, w, 4)
    assert bool((c >= e.min(0).values - 1e-6).all()) and bool((c + 15 * s <= e.max(0).values + 1e-5).all())
    assert torch.allclose(s, s_all, rtol=0.15) and torch.allclose(c, c_all, atol=0.15 * float(s_all.max()) * 15)
