"""``kernels/dlrm_fast.cpp`` against torch on ragged / empty / largest-id batches."""

import pytest
import torch
from torch import nn

from rewrite.core.errors import RewriteError
from rewrite.core.model import DotInteraction, interaction_pairs, mlp, split_bags
from rewrite.core.synthetic import multi_hot_batch
from passes.quantized import RowwiseQuantizedBag
from rewrite.core.embedding import TableBag
from targets.native.fast_kernels import PAIR_ORDERS, OneDnnMlp, TableStore, bf16_pairs, kernels, small_model, store_tables
from tests.tolerances import assert_close, path_tolerance
from targets.native.int8_kernels import pad_to
from tests.targets.checks import ref_quantize

# the first test on a machine builds the extension (~30 s per ISA tier); every tier this host runs
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isa_tier")]
torch.set_num_threads(1)
ROWS = [1000, 300, 37, 5]


FORMATS = {"f32": None, "f16": 16, "int8": 8, "int4": 4, "int2": 2}
MIXED = ("f32", "int8", "int4", "f16")                        # one table in each of four formats


def make_tables(dim: int, formats=("f32",) * len(ROWS), sizes=ROWS, mode: str = "sum", seed: int = 0):
    """One representation per table, each in its format, from N(0, 0.1²) fp32 rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, fmt in zip(sizes, formats):
        w = torch.randn(rows, dim, generator=g) * 0.1
        if FORMATS[fmt] is None or FORMATS[fmt] == 16:
            out.append(TableBag(rows, dim, mode, "float32" if FORMATS[fmt] is None else "float16", weight=w))
        else:
            out.append(RowwiseQuantizedBag.from_table(w, FORMATS[fmt], mode)[0])
    return out


NO_PRE = torch.empty(0)          # no pre-pooled features


def fused(tables) -> TableStore:
    return store_tables(tables, list(range(len(tables))), tables[0].dim)


def reference_bags(tables, batch) -> torch.Tensor:
    """[B, F, d]: each table's own eager forward (the reference every engine is held to)."""
    bags = split_bags(batch.indices, batch.offsets, len(tables))
    with torch.no_grad():
        return torch.stack([t(bags[2 * f], bags[2 * f + 1]) for f, t in enumerate(tables)], 1)


def test_table_store_holds_every_tables_bytes_in_2mib_aligned_memory():
    tables = make_tables(16, MIXED)
    store = fused(tables)
    assert store.w.data_ptr() % (2 << 20) == 0 and store.feat[:, 1].tolist() == [0, 2, 3, 1]
    for t, base in zip(tables, store.feat[:, 2].tolist()):
        raw = t.row_storage().rows.reshape(-1)
        assert base % 64 == 0 and torch.equal(store.w[base:base + raw.numel()], raw)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("dim", [16, 8, 5])
@pytest.mark.parametrize("formats", [("f32",) * 4, ("f16",) * 4, ("int8",) * 4, ("int4",) * 4, ("int2",) * 4, MIXED],
                         ids=["f32", "f16", "int8", "int4", "int2", "mixed"])
def test_gather_bags_equals_each_tables_eager_bags(mode, dim, formats):
    tables = make_tables(dim, formats, mode=mode)
    store = fused(tables)
    w, feat, d = store.args()
    for b, mean_len, empty in ((1, 3.0, 0.2), (3, 0.0, 1.0), (700, 3.0, 0.2)):
        batch = multi_hot_batch(ROWS, b, 13, mean_len, seed=b, empty_fraction=empty)
        got = kernels().gather_bags(w, batch.indices, batch.offsets, feat, d, NO_PRE)
        assert_close(got, reference_bags(tables, batch), "float32", f"gather_bags {formats} d={dim} B={b}")


@pytest.mark.parametrize("order", list(PAIR_ORDERS))
@pytest.mark.parametrize("dim,generic", [(16, False), (16, True), (8, False)])
def test_embed_interact_equals_dot_interaction_rounded_to_bf16(order, dim, generic):
    tables = make_tables(dim, MIXED)
    w, feat, d = fused(tables).args()
    n_pairs = len(interaction_pairs(len(ROWS) + 1, order))
    kp = -(-(dim + n_pairs) // 16) * 16 + 16                  # extra padding must come out zero
    for b in (1, 2, 300):                                      # 300: more than one 256-sample chunk
        batch = multi_hot_batch(ROWS, b, 13, 3.0, seed=b, empty_fraction=0.2)
        x = torch.randn(b, dim)
        z = kernels().embed_interact(w, batch.indices, batch.offsets, feat, d, NO_PRE, x,
                                     PAIR_ORDERS[order], kp, generic)
        assert z.dtype == torch.bfloat16 and z.shape == (b, kp)
        e = reference_bags(tables, batch)
        ref = DotInteraction(len(ROWS) + 1, order)(x, list(e.unbind(1)))
        assert_close(z[:, :dim + n_pairs].float(), ref.to(torch.bfloat16).float(), "bf16-rounded",
                     f"embed_interact {order} d={dim} generic={generic} B={b}")
        assert not z[:, dim + n_pairs:].any()


@pytest.mark.parametrize("features,dim,order", [(26, 16, "dlrm"), (26, 16, "torchrec"), (26, 16, "dlrm-self"),
                                                (31, 16, "dlrm-self"), (3, 16, "dlrm"), (5, 8, "dlrm"),
                                                (40, 16, "dlrm")])
def test_embed_interact_q8_is_the_interaction_quantized_per_row(features, dim, order):
    """26 features: Criteo's shape (the AVX-512 and AVX2 Grams, pairs past column 16, the torchrec
    order's compressed stores); 31 with self pairs: all 32 columns of the tile (the AVX2 Gram's
    rows in pairs); 40: more vectors than the tile (plain loops); d = 8 likewise."""
    g = torch.Generator().manual_seed(features)
    sizes = [1 + 37 * f for f in range(features)]
    tables = make_tables(dim, [list(FORMATS)[f % len(FORMATS)] for f in range(features)], sizes, seed=features)
    w, feat, d = fused(tables).args()
    n_pairs = len(interaction_pairs(features + 1, order))
    kp = pad_to(dim + n_pairs) + 8                             # extra padding must come out zero
    for b in (1, 33, 300):                                     # 300: more than one 256-sample chunk
        batch = multi_hot_batch(sizes, b, 13, 2.0, seed=b, empty_fraction=0.2)
        x = torch.randn(b, dim, generator=g)
        x[0] = 0                                               # with empty bags: an all-zero row
        q, s = kernels().embed_interact_q8(w, batch.indices, batch.offsets, feat, d, NO_PRE, x,
                                           PAIR_ORDERS[order], kp, False)
        ref = DotInteraction(features + 1, order)(x, list(reference_bags(tables, batch).unbind(1)))
        rq, rs = ref_quantize(ref, kp)
        assert q.dtype == torch.int8 and q.shape == (b, kp) and not q[:, dim + n_pairs:].any()
        assert_close(s, rs, "interaction-row-scale", f"{features} features d={dim} {order} B={b}")
        assert (q.int() - rq.int()).abs().max() <= 1           # f32 FMA order vs torch's: a tie may round apart


def test_out_of_range_ids_and_bad_tables_are_an_error_not_a_read():
    w, feat, d = fused(make_tables(16, MIXED)).args()
    batch = multi_hot_batch(ROWS, 5, 13, 2.0, seed=1)
    for bad_id in (ROWS[0], -1):                               # one past the first table; negative
        bad = batch.indices.clone()
        bad[0] = bad_id
        with pytest.raises(RuntimeError, match="an index is outside its table's rows"):
            kernels().gather_bags(w, bad, batch.offsets, feat, d, NO_PRE)
        with pytest.raises(RuntimeError, match="an index is outside its table's rows"):
            kernels().embed_interact(w, bad, batch.offsets, feat, d, NO_PRE, torch.zeros(5, 16), 0, 32 * 3,
                                     False)
        with pytest.raises(RuntimeError, match="an index is outside its table's rows"):
            kernels().embed_interact_q8(w, bad, batch.offsets, feat, d, NO_PRE, torch.zeros(5, 16), 0,
                                        32 * 3, False)
    with pytest.raises(RuntimeError, match="offsets must run from 0 to len"):
        kernels().gather_bags(w, batch.indices[1:], batch.offsets, feat, d, NO_PRE)
    grown = feat.clone()
    grown[3, 3] += 10 ** 6                                     # feature 3's rows
    with pytest.raises(RuntimeError, match="feature 3: its table lies outside W"):
        kernels().gather_bags(w, batch.indices, batch.offsets, grown, d, NO_PRE)
    bad_fmt = feat.clone()
    bad_fmt[0, 1] = 7
    with pytest.raises(RuntimeError, match="feature 0: format 7 is not 0"):
        kernels().gather_bags(w, batch.indices, batch.offsets, bad_fmt, d, NO_PRE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_onednn_mlp_matches_fp32_and_keeps_the_logit_fp32(dtype):
    from targets.native.fast_kernels import bf16_gemm_missing

    if dtype == torch.bfloat16 and bf16_gemm_missing():
        with pytest.raises(RewriteError, match="oneDNN bfloat16 MLP: .*avx512"):
            OneDnnMlp(mlp([13, 16], True), dtype=dtype)
        pytest.skip(f"bf16 MLPs: {bf16_gemm_missing()}")
    torch.manual_seed(0)
    for widths, relu_last, k_in in (([13, 512, 256, 64, 16], True, None), ([367, 512, 256, 1], False, 368)):
        net = mlp(widths, relu_last).eval()
        x = torch.randn(300, widths[0])
        fast = OneDnnMlp(net, k_in=k_in, dtype=dtype)
        assert fast.final == (widths[-1] == 1 and dtype == torch.bfloat16)
        xin = nn.functional.pad(x, (0, (k_in or widths[0]) - widths[0])).to(dtype)
        key = "bf16-mlp-vs-fp32" if dtype == torch.bfloat16 else "float32"
        with torch.inference_mode():
            assert_close(fast(xin).float(), net(x), key, f"OneDnnMlp {widths} {dtype}")
            if fast.final:                                     # the last layer adds no bf16 rounding
                y = fast.hidden(xin)
                assert_close(fast(xin).squeeze(1), y.float() @ fast.w_final + fast.b_final, "float32",
                             f"OneDnnMlp {widths}: the fp32 last layer")


def test_onednn_mlp_answers_every_row_count_with_its_own_rows():
    torch.manual_seed(1)
    net = mlp([13, 64, 16], True).eval()
    fast = OneDnnMlp(net, dtype=torch.float32)
    with torch.inference_mode():
        for m in (1, 17, 261, 1025):          # padded to 18, 288, 1152 rows inside
            x = torch.randn(m, 13)
            y = fast(x)
            assert y.shape == (m, 16)
            assert_close(y, net(x), "float32", f"OneDnnMlp at {m} rows")


def test_small_model_equals_the_model_in_bf16_and_refuses_bad_shapes():
    from tests.helpers import small_model as trained_like

    model = trained_like(rows=tuple(ROWS))
    kp = -(-(16 + len(interaction_pairs(len(ROWS) + 1, "dlrm"))) // 16) * 16
    net = small_model(fused([model.embeddings[t] for t in model.feature_tables]), model.bottom, model.top,
                      model.spec.n_dense, 0, kp)
    atol, rtol = path_tolerance("bf16-dense")
    for b in (1, 3, 8):
        batch = multi_hot_batch(ROWS, b, model.spec.n_dense, 3.0, seed=b, empty_fraction=0.2)
        with torch.inference_mode():
            torch.testing.assert_close(net(batch.dense, batch.indices, batch.offsets, NO_PRE), model(*batch.inputs()),
                                       atol=atol, rtol=rtol)
    with pytest.raises(RuntimeError, match="layer shapes do not chain"):
        net(batch.dense[:, :5].contiguous(), batch.indices, batch.offsets, NO_PRE)


def test_bf16_pairs_layout():
    w = torch.arange(15, dtype=torch.float32).reshape(3, 5)          # N = 3, K = 5 (odd)
    p = bf16_pairs(w)
    assert p.shape == (3, 3, 2)
    for c in range(3):
        for j in range(3):
            for q in range(2):
                assert p[c, j, q] == (w[j, 2 * c + q] if 2 * c + q < 5 else 0)
