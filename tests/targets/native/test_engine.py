import numpy as np
import pytest
import torch

import passes
from rewrite.bundling import compile_model
from rewrite.core import isa
from rewrite.core.embedding import TableBag
from rewrite.core.errors import RewriteError
from rewrite.core.model import split_bags
from rewrite.pass_manager import apply
from rewrite.runtime import load
from rewrite.core.synthetic import multi_hot_batch
from targets.base import get_target
from rewrite.core.batch import split_bags_np
from targets.native.fast_kernels import kernels
from targets.native.int8_kernels import int8_mlp_wrong
from targets.native.engine import INT8_MIN_BATCH, SMALL_MAX_BATCH, FastDLRM, FastInt8DLRM, FastRunner, FusedTables
from tests.helpers import small_model
from tests.targets.checks import BATCHES, assert_matches_eager, lower_and_load
from tests.tolerances import assert_close, path_tolerance

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("isa_tier")       # every test at every ISA tier this host runs


@pytest.fixture(scope="module")
def model():
    return small_model(rows=(1000, 300, 37, 5))


def test_matches_eager_on_ragged_empty_and_largest_id_batches(model, tmp_path):
    _, runner = lower_and_load(get_target("torch-fast"), model, tmp_path)
    worst = assert_matches_eager(runner, model, "bf16-dense")
    assert worst > 0            # bf16 really ran (fp32 would agree to ~1e-7)


@torch.inference_mode()
@pytest.mark.parametrize("pairs", ["dlrm", "dlrm-self", "torchrec"])
def test_every_form_agrees_with_eager_at_every_size(pairs):
    from dataclasses import replace

    from rewrite.core.model import RecModel

    base = small_model(rows=(1000, 300, 37, 5))
    model = RecModel(replace(base.spec, pairs=pairs), dict(base.embeddings)).eval()
    model.bottom.load_state_dict(base.bottom.state_dict())
    top = model.top[0]
    with torch.no_grad():                 # the dlrm-self top MLP is wider: give it seeded weights
        top.weight.copy_(torch.randn(top.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    for later, layer in zip(model.top[1:], base.top[1:]):
        later.load_state_dict(layer.state_dict())
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    nets = [(FastDLRM(model).eval(), "bf16-dense")]
    if not int8_mlp_wrong():
        nets.append((FastInt8DLRM(model).eval(), "int8-dense"))
    for net, precision in nets:
        atol, rtol = path_tolerance(precision)
        for form in ("small", "batched", "int8")[:2 + isinstance(net, FastInt8DLRM)]:
            for b in (1, 2, 7, SMALL_MAX_BATCH + 1, 300):     # every tile remainder of the int8 kernels
                batch = multi_hot_batch(rows, b, model.spec.n_dense, 3.0, seed=b, empty_fraction=0.2)
                np.testing.assert_allclose(net.run_form(form, *batch.inputs()).numpy(),
                                           model(*batch.inputs()).numpy(), atol=atol, rtol=rtol,
                                           err_msg=f"{type(net).__name__} {form} B={b}")


@torch.inference_mode()
def test_fused_tables_lookup_equals_per_table_bags(model):
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    batch = multi_hot_batch(rows, 63, model.spec.n_dense, 3.0, seed=3, empty_fraction=0.2)
    t = FusedTables(model)
    w, feat, d = t.store.args()
    pooled = kernels().gather_bags(w, batch.indices, batch.offsets, feat, d, t.pre(batch.indices, batch.offsets))
    pooled = pooled.transpose(0, 1)
    bags = split_bags(batch.indices, batch.offsets, len(rows))
    for f, table in enumerate(model.feature_tables):
        ref = model.embeddings[table](bags[2 * f], bags[2 * f + 1])
        assert_close(pooled[f], ref, "float32", f"feature {f}")


def test_predictor_uses_the_canonical_batch(model, tmp_path):
    compile_model(model, tmp_path / "b", ["torch-fast"], latency_sizes=(1,))
    pred = load(tmp_path / "b")
    assert hasattr(pred.runner("torch-fast"), "canonical")
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    batch = multi_hot_batch(rows, 5, model.spec.n_dense, 2.0, seed=4, empty_fraction=0.3)
    got = pred.predict(*batch.inputs(), path="torch-fast")
    split = pred.runner("torch-fast")(batch.dense.numpy(), split_bags_np(batch.indices.numpy(), batch.offsets.numpy(), 4))
    np.testing.assert_array_equal(pred.logits(*batch.inputs(), path="torch-fast"), split)
    atol, rtol = path_tolerance("bf16-dense")          # on logits: the table's row for bf16 MLPs
    np.testing.assert_allclose(pred.logits(*batch.inputs(), path="torch-fast"), model(*batch.inputs()).detach().numpy(),
                               atol=atol, rtol=rtol)
    assert_close(got, 1 / (1 + np.exp(-pred.logits(*batch.inputs(), path="torch-fast"))), "sigmoid", "predict vs logits")


def runnable(name: str):
    """The target ``name``, skipped by name where it cannot run in this process (torch-fast-int8 at
    the generic tier of a process capped at avx2: ``test_int8_path_matches_eager...`` asserts that
    refusal); the tests that use it are about the tables, which torch-fast still covers there."""
    target = get_target(name)
    why = target.unavailable()
    if why:
        pytest.skip(f"{name}: {why}")
    return target


@pytest.mark.parametrize("name", ["torch-fast", "torch-fast-int8"])
def test_fp16_tables_match_eager_of_the_fp16_model(model, tmp_path, name):
    half, _ = apply(model, [passes.quantize(bits=16)])
    _, runner = lower_and_load(runnable(name), half, tmp_path)
    assert runner.net.tables.formats == ["f16"] * 4                 # lookups read 2-byte elements
    assert assert_matches_eager(runner, half, get_target(name).precision) > 0


@pytest.mark.parametrize("name", ["torch-fast", "torch-fast-int8"])
@pytest.mark.parametrize("bits", [8, 4, 2, "mixed"])
def test_rowwise_quantized_tables_run_fused_and_match_eager_of_the_quantized_model(model, tmp_path, name, bits):
    """Row-wise int8 / int4 / int2 tables (and a model mixing fp32, fp16, int8 and int4 tables) enter
    the fused engine: decoded in registers, compared with eager of the same quantized model."""
    if bits == "mixed":
        q, _ = apply(model, [passes.quantize(bits=8, tables=("t0",)), passes.quantize(bits=4, tables=("t1",)),
                             passes.quantize(bits=16, tables=("t2",))])
    else:
        q, _ = apply(model, [passes.quantize(bits=bits)])
    _, runner = lower_and_load(runnable(name), q, tmp_path)
    formats = runner.net.tables.formats
    assert formats == (["int8-rowwise", "int4-rowwise", "f16", "f32"] if bits == "mixed" else [f"int{bits}-rowwise"] * 4)
    assert assert_matches_eager(runner, q, get_target(name).precision) > 0


def test_refuses_tables_it_cannot_fuse(model, tmp_path):
    mixed = model.with_tables({"t1": TableBag(300, 8, weight=torch.zeros(300, 8))})
    with pytest.raises(RewriteError, match=r"one dim \(the dot interaction's\), found dims \[8, 16\]"):
        get_target("torch-fast").lower(mixed, None, tmp_path)
    from dataclasses import replace

    from rewrite.core.model import RecModel

    cat = RecModel(replace(model.spec, interaction="cat"), dict(model.embeddings))
    with pytest.raises(RewriteError, match="torch-fast supports the dot and dcn interactions, not 'cat'"):
        get_target("torch-fast").lower(cat, None, tmp_path)


def test_mlps_follow_the_isa_tier(model, isa_tier):
    from targets.native.amx_mlp import AmxMlp
    from targets.native.fast_kernels import OneDnnMlp

    net = FastDLRM(model)
    expected = {"amx": AmxMlp, "avx512": OneDnnMlp, "avx2": OneDnnMlp, "generic": OneDnnMlp}[isa_tier]
    assert type(net.bottom16) is expected
    if isa_tier in ("avx2", "generic"):       # no bf16 arithmetic below AVX512-BF16: fp32 MLPs
        assert net.bottom16.dtype == net.top16.dtype == torch.float32


def test_int8_path_matches_eager_and_runs_int8_at_large_batches(model, tmp_path, isa_tier):
    from targets.native.avx2_mlp import Avx2Int8Mlp
    from targets.native.int8_kernels import Int8Mlp
    from targets.native.vnni_mlp import VnniMlp, shape_missing, vnni_missing

    from targets.native.int8_kernels import int8_mlp_wrong

    target = get_target("torch-fast-int8")
    assert target.precision == "int8-dense"
    if int8_mlp_wrong():        # Int8Mlp on a saturating _int_mm (the generic tier in a process capped at avx2)
        assert isa_tier == "generic" and target.unavailable() == int8_mlp_wrong()
        with pytest.raises(RewriteError, match="torch-fast-int8 cannot run this model here: the bottom MLP: its int8"):
            lower_and_load(target, model, tmp_path)
        return
    net = FastInt8DLRM(model).eval()          # no measured plan: int8 throughout
    for mlp, net_mlp in ((model.bottom, net.bottom8), (model.top, net.top8)):
        assert type(net_mlp) is (VnniMlp if vnni_missing() is None and shape_missing(mlp) is None
                                 else Avx2Int8Mlp if isa_tier != "generic" else Int8Mlp)
        if isa_tier in ("avx2", "generic"):       # no VNNI: masked by the tier, or a CPU without it
            assert vnni_missing() is not None
            if isa.missing("avx512bw", "avx512_vnni", tier=isa.host_tier()) is None:
                assert "above the forced ISA tier" in vnni_missing()
    assert assert_matches_eager(FastRunner(net), model, "int8-dense") > 0
    assert max(b for b, _, _ in BATCHES) >= INT8_MIN_BATCH     # the int8 form really ran
    _, runner = lower_and_load(target, model, tmp_path)      # the split measured at compile
    assert assert_matches_eager(runner, model, "int8-dense") > 0


def dcn_model(dim: int = 128, rows=(700, 90, 5, 33), seed: int = 0):
    """A DLRM_DCN (DLRMv2's interaction) with d = 128 and trained-like weights."""
    from rewrite.core.model import ModelSpec, RecModel

    g = torch.Generator().manual_seed(seed)
    tables = {f"t{i}": TableBag(r, dim, weight=torch.randn(r, dim, generator=g) * 0.05) for i, r in enumerate(rows)}
    spec = ModelSpec(n_dense=13, bottom=(32, dim), top=(24, 1), features=tuple((f"f{i}", f"t{i}") for i in range(len(rows))),
                     interaction="dcn", pairs="torchrec", cross_layers=2, cross_rank=8)
    model = RecModel(spec, tables)
    with torch.no_grad():
        for m in (model.bottom, model.interaction, model.top):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.eval()


@torch.inference_mode()
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_dcn_with_d128_multi_hot_matches_eager(bits, tmp_path):
    """torch-fast takes DLRM_DCN: fused lookup of d = 128 multi-hot bags (fp32, int8, int4 rows),
    cross net, MLPs; every batch size agrees with eager of the same model."""
    from targets.native.engine import FastDCN

    model = dcn_model()
    if bits is not None:
        model, _ = apply(model, [passes.quantize(bits=bits)])
    _, runner = lower_and_load(get_target("torch-fast"), model, tmp_path)
    assert isinstance(runner.net, FastDCN)
    assert runner.net.tables.formats == ["f32" if bits is None else f"int{bits}-rowwise"] * 4
    assert assert_matches_eager(runner, model, "bf16-dense") > 0
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    atol, rtol = path_tolerance("bf16-dense")
    for b in (1, SMALL_MAX_BATCH + 1, 300):
        batch = multi_hot_batch(rows, b, 13, 6.0, seed=b, empty_fraction=0.2)
        got = runner.canonical(*(t.numpy() for t in batch.inputs()))
        np.testing.assert_allclose(got, model(*batch.inputs()).numpy(), atol=atol, rtol=rtol)


def test_int8_path_refuses_dcn(tmp_path):
    with pytest.raises(RewriteError, match="torch-fast-int8 supports the dot interaction, not 'dcn'"):
        get_target("torch-fast-int8").lower(dcn_model(), None, tmp_path)
