"""quantize: FBGEMM's fused row-wise bytes, lookups, bounds, bytes, skips, round trip, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import passes
import rewrite
from passes.quantized import RowwiseQuantizedBag, quantize_rows
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.pass_contract import parse_pass
from rewrite.pass_manager import apply, table_bags
from tests.pass_helpers import assert_exports, batches, small_model
from tests.tolerances import assert_close

torch.set_num_threads(1)

PREPACK = {8: torch.ops.quantized.embedding_bag_byte_prepack,
           4: torch.ops.quantized.embedding_bag_4bit_prepack,
           2: torch.ops.quantized.embedding_bag_2bit_prepack}
LOOKUP = {8: torch.ops.quantized.embedding_bag_byte_rowwise_offsets,
          4: torch.ops.quantized.embedding_bag_4bit_rowwise_offsets,
          2: torch.ops.quantized.embedding_bag_2bit_rowwise_offsets}


def awkward_table(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows at several scales, plus a constant row, a row of one sign, a zero row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g) * torch.logspace(-3, 1, rows).unsqueeze(1)
    w[1] = 0.37
    w[2] = torch.rand(dim, generator=g) + 5.0
    w[3] = 0.0
    return w


def fbgemm_reference(w: np.ndarray, bits: int) -> np.ndarray:
    """FBGEMM's reference quantizers (QuantUtils.cc ...SBFloatRef / ...SBHalfRef), row by row in
    numpy float32, written from the C: an independent check, including odd widths FBGEMM's
    optimised path (and torch's prepack) refuse."""
    f32 = np.float32
    out = []
    for row in w.astype(np.float32):
        lo, hi = row.min(), row.max()
        if bits == 8:
            rng = f32(hi - lo)
            inv = f32(255.0) / f32(rng + f32(1e-8))
            codes = np.rint((row - lo) * inv).astype(np.uint8)
            tail = np.array([rng / f32(255.0), lo], dtype=np.float32).view(np.uint8)
            out.append(np.concatenate([codes, tail]))
            continue
        per, levels = 8 // bits, (1 << bits) - 1
        bias16 = np.float16(lo)
        lo = f32(bias16)
        rng = f32(hi - lo)
        scale = f32(1.0) if rng == 0 else f32(rng / f32(levels))
        scale = f32(np.float16(scale))
        scale = f32(1.0) if scale == 0 else scale
        inv = f32(1.0) / scale
        q = np.clip(np.rint((row - lo) * inv), 0, levels).astype(np.uint8)
        packed = np.zeros(-(-len(row) // per), dtype=np.uint8)
        for col, v in enumerate(q):
            packed[col // per] |= v << ((col % per) * bits)
        tail = np.array([np.float16(scale), bias16], dtype=np.float16).view(np.uint8)
        out.append(np.concatenate([packed, tail]))
    return np.stack(out)


@pytest.mark.parametrize("bits,dim", [(8, 16), (8, 7), (4, 16), (4, 64), (2, 16), (2, 32)])
def test_bytes_match_fbgemm_prepack(bits, dim):
    w = awkward_table(300, dim)
    packed, _ = quantize_rows(w, bits)
    assert torch.equal(packed, PREPACK[bits](w))


@pytest.mark.parametrize("bits,dim", [(4, 7), (4, 9), (2, 5), (2, 6), (2, 7), (8, 3)])
def test_odd_widths_match_fbgemm_reference(bits, dim):
    w = awkward_table(200, dim, seed=dim)
    packed, _ = quantize_rows(w, bits)
    assert np.array_equal(packed.numpy(), fbgemm_reference(w.numpy(), bits))
    per = 8 // bits
    if dim % per:   # padding codes are zero: the last code byte has no bits above the real codes
        assert int(packed[:, dim // per].max()) < 1 << ((dim % per) * bits)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_lookup_matches_fbgemm_embedding_bag(bits):
    w = awkward_table(500, 16)
    rep, _ = RowwiseQuantizedBag.from_table(w, bits)
    model = small_model(rows=(500,), dim=16)
    for b in batches(model, n=2, batch=128, mean_len=3.0):
        idx, off = b.indices, b.offsets
        ref = LOOKUP[bits](rep.packed, idx, off, include_last_offset=True)
        assert_close(rep(idx, off), ref, "float32")


@pytest.mark.parametrize("bits,dim", [(8, 16), (4, 16), (4, 7), (2, 16), (2, 5)])
def test_error_within_derived_bound_per_element_and_per_bag(bits, dim):
    w = awkward_table(400, dim)
    rep, bound = RowwiseQuantizedBag.from_table(w, bits)
    err = (rep.dense_rows(torch.arange(400)) - w).abs()
    assert float(err.max()) <= bound * (1 + 1e-6) + 1e-7
    # the bound is tight: some element comes within a factor 2 of it
    assert float(err.max()) >= bound / 2
    model = small_model(rows=(400,), dim=dim)
    for b in batches(model, n=2, batch=128, mean_len=4.0):
        with torch.no_grad():
            ref = TableBag(400, dim, weight=w)(b.indices, b.offsets)
        lengths = (b.offsets[1:] - b.offsets[:-1]).clamp(min=1).unsqueeze(1)
        assert float(((rep(b.indices, b.offsets) - ref).abs() / lengths).max()) <= bound * (1 + 1e-5) + 1e-6


def test_byte_counts_by_hand():
    w = awkward_table(1000, 7)
    table = 128   # the 32-entry fp32 exponent table
    assert RowwiseQuantizedBag.from_table(w, 8)[0].num_bytes() == 1000 * (7 + 8) + table
    assert RowwiseQuantizedBag.from_table(w, 4)[0].num_bytes() == 1000 * (4 + 4) + table
    assert RowwiseQuantizedBag.from_table(w, 2)[0].num_bytes() == 1000 * (2 + 4) + table
    assert RowwiseQuantizedBag.from_table(w, 4)[0].bytes_per_lookup() == 8


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_pass_through_pipeline_within_tolerance(bits):
    model = small_model()
    sample = batches(model)
    rw, report = apply(model, [passes.quantize(bits=bits)], sample=sample)
    done = {t.table: t for t in report.tables if t.status == "rewritten"}
    # int forms of t0 (3 rows) are not smaller than the table: the 128 B exponent table
    assert set(done) == ({"t0", "t1", "t2", "t3"} if bits == 16 else {"t1", "t2", "t3"})
    assert report.ok and all(t.within_tolerance for t in done.values())
    for name, t in done.items():
        rows, dim = model.embeddings[name].rows, model.embeddings[name].dim
        expected = rows * dim * 2 if bits == 16 else rows * (-(-dim * bits // 8) + (8 if bits == 8 else 4)) + 128
        assert t.bytes_after == expected == rw.embeddings[name].num_bytes()
    if bits == 16:
        assert rw.embeddings["t3"].weight.dtype == torch.float16
        for name in done:
            for idx, off in table_bags(model, sample, name):
                assert_close(rw.embeddings[name](idx, off), model.embeddings[name](idx, off), "fp16-rounded")
    assert report.max_abs_logit_diff > 0
    assert isinstance(model.embeddings["t3"], TableBag) and model.embeddings["t3"].weight.dtype == torch.float32


def test_mean_pooling():
    w = awkward_table(300, 8)
    rep, bound = RowwiseQuantizedBag.from_table(w, 4, pooling="mean")
    ref = TableBag(300, 8, pooling="mean", weight=w)
    b = batches(small_model(rows=(300,)), n=1, batch=64, mean_len=3.0)[0]
    with torch.no_grad():
        assert float((rep(b.indices, b.offsets) - ref(b.indices, b.offsets)).abs().max()) <= bound + 1e-6


def test_skip_reasons():
    model = small_model()
    with torch.no_grad():
        model.embeddings["t2"].weight[5, 0] = float("nan")
        model.embeddings["t1"].weight[0, 0] = 1e5
    model.embeddings["t3"] = TableBag(1000, 8, dtype="float16", weight=model.embeddings["t3"].weight)
    _, report = apply(model, [passes.quantize(bits=4)])
    reasons = {t.table: t.reason for t in report.tables}
    assert reasons["t0"] == "the int4 form (152 B) is not smaller than the table (96 B)"
    assert reasons["t1"] == ("values up to 100000 exceed fp16's range (65504), which int4's fp16 "
                             "scale and bias need")
    assert reasons["t2"] == "the table holds inf or nan values"
    assert reasons["t3"] == "quantize rewrites fp32 plain tables, this is table 1000x8 float16"
    _, report16 = apply(model, [passes.quantize(bits=16, tables=("t1",))])
    assert report16.tables[0].reason == "values up to 100000 exceed fp16's range (65504)"


def test_quantizing_twice_skips_the_quantized_table():
    model = small_model()
    _, report = apply(model, [passes.quantize(bits=8, tables=("t3",)), passes.quantize(bits=4, tables=("t3",))])
    assert [t.status for t in report.tables] == ["rewritten", "skipped"]
    assert report.tables[1].reason == "quantize rewrites fp32 plain tables, this is rowwise int8 1000x8 (fp32 scale+bias)"


def test_config_validation():
    with pytest.raises(RewriteError, match=r"option bits='3': must be one of 16, 8, 4, 2"):
        parse_pass("quantize:bits=3")
    with pytest.raises(RewriteError, match=r"pass quantize: bits must be one of 16, 8, 4, 2 \(got 3\)"):
        passes.quantize(bits=3)
    with pytest.raises(ValueError, match="rowwise bits must be 8, 4 or 2, got 16"):
        RowwiseQuantizedBag(4, 4, 16)


@pytest.mark.parametrize("bits", [16, 8, 2])
def test_round_trip_native_format(tmp_path, bits):
    model = small_model()
    rw, _ = apply(model, [passes.quantize(bits=bits)])
    rewrite.save(rw, tmp_path / "q.safetensors")
    back = rewrite.load(tmp_path / "q.safetensors")
    for k, v in rw.state_dict().items():
        assert v.dtype == back.state_dict()[k].dtype and torch.equal(v, back.state_dict()[k]), k
    b = batches(model, n=1)[0]
    assert torch.equal(back(*b.inputs()), rw(*b.inputs()))


def test_capture_lint_and_export():
    model = small_model()
    rw, _ = apply(model, [passes.quantize(bits=4, tables=("t2",)), passes.quantize(bits=8, tables=("t3",)),
                          passes.quantize(bits=16, tables=("t1",))])
    gm, sites = rewrite.capture(rw)
    gm.graph.lint()
    assert [s.representation for s in sites] == ["table", "table", "rowwise", "rowwise"]
    ex, check = batches(model, n=2, seed=5)
    assert_exports(rw, ex, check)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_from_table_in_row_blocks_equals_one_block(bits, monkeypatch):
    """Large tables are quantized in row blocks (bounded temporaries): same bytes, same bound."""
    from rewrite.core import mapped

    w = torch.randn(1001, 13) * torch.linspace(0.01, 3.0, 1001).unsqueeze(1)
    whole, bound = RowwiseQuantizedBag.from_table(w, bits)
    monkeypatch.setattr(mapped.row_blocks, "__defaults__", (13 * 4 * 64,))    # 64-row blocks
    blocks, block_bound = RowwiseQuantizedBag.from_table(w, bits)
    assert torch.equal(whole.packed, blocks.packed) and bound == block_bound


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fbgemm_kernel_writes_the_same_bytes_and_bound(bits):
    """FBGEMM's row-wise quantizers (used where installed) against the torch reference, with
    constant, negative, tiny and wide rows."""
    from passes.quantized import fbgemm_quantizers, quantize_block

    if fbgemm_quantizers() is None:
        pytest.skip("fbgemm-gpu-cpu is not installed here")
    for dim in (40, 37):             # 37: FBGEMM's n-bit kernel refuses it, the torch ops serve
        g = torch.Generator().manual_seed(bits)
        w = torch.randn(3000, dim, generator=g) * torch.logspace(-6, 2, 3000).unsqueeze(1)
        w[0], w[1], w[2] = 0.0, -1.5, torch.linspace(-3e-3, 5e-3, dim)
        ref, ref_bound = quantize_block(w, bits, fbgemm=False)
        got, bound = quantize_block(w, bits)
        assert torch.equal(got, ref) and bound == ref_bound
