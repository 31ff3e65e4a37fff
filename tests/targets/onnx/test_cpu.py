import gc
import shutil

import numpy as np
import onnx
import pytest
import torch

from rewrite.core.errors import RewriteError
from targets.onnx import huge_pages as onnx_huge_pages
from targets.base import get_target
from rewrite.core.batch import split_bags_np
from targets.onnx.cpu import QUANTIZED_OPS
from tests.representations import REPRESENTATIONS, composite_model
from tests.targets import checks
from tests.targets.checks import assert_matches_eager, lower_and_load

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return composite_model()


@pytest.fixture(scope="module")
def fp32(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-cpu")
    compiled, runner = lower_and_load(get_target("onnx-cpu"), model, out)
    return out, compiled, runner


@pytest.fixture(scope="module")
def int8(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-cpu-int8")
    compiled, runner = lower_and_load(get_target("onnx-cpu-int8"), model, out)
    return out, compiled, runner


def test_every_representation_matches_eager(model, fp32):
    assert {name for name, _ in REPRESENTATIONS} <= {t.split("_", 1)[1] for t in model.embeddings}
    assert assert_matches_eager(fp32[2], model, "fp32") < 2e-5


def test_graph_is_loop_free_opset18_with_dynamic_batch_and_lookups(model, fp32):
    out, compiled, _ = fp32
    assert compiled.files == ["model.onnx"]
    g = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(g)
    ops = all_ops(g.graph)
    assert "Loop" not in ops and {"If", "ScatterND", "CumSum"} <= ops     # bags: targets.onnx.bags
    assert max(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) >= 18
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.graph.input}
    n_features = len(model.spec.features)
    assert len(dims) == 1 + 2 * n_features
    assert isinstance(dims["dense"][0], str) and dims["dense"][1] == model.spec.n_dense
    for f in range(n_features):
        assert isinstance(dims[f"indices_{f}"][0], str)
        assert dims[f"offsets_{f}"][0] == f"{dims['dense'][0]} + 1"   # offsets are B + 1
    assert len({dims[f"indices_{f}"][0] for f in range(n_features)}) == n_features


def all_ops(graph) -> set[str]:
    """Op types of a graph and of every subgraph (If branches) in it."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops |= all_ops(attr.g)
    return ops


def test_session_options(fp32):
    session = get_target("onnx-cpu").load(fp32[0], fp32[1], threads=1).session
    opts = session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.graph_optimization_level.name == "ORT_ENABLE_ALL"
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_external_data_above_threshold(model, fp32, tmp_path):
    compiled, runner = lower_and_load(get_target("onnx-cpu"), model, tmp_path, external_threshold=0)
    assert compiled.files == ["model.onnx", "model.onnx.data"]
    inline = (fp32[0] / "model.onnx").stat().st_size
    data = (tmp_path / "model.onnx.data").stat().st_size
    assert data > model.embedding_bytes() // 2
    assert (tmp_path / "model.onnx").stat().st_size < inline - data // 2
    assert_matches_eager(runner, model, "fp32")


def test_int8_quantizes_the_mlps_and_nothing_else(model, int8):
    out, compiled, runner = int8
    g = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in g.graph.node]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in [*model.bottom, *model.top])
    assert ops.count("MatMulInteger") == n_linear == compiled.options["quantized_matmuls"]
    assert all(op in ops for op in QUANTIZED_OPS) and "Gemm" not in ops
    init = {i.name: i for i in g.graph.initializer}
    for n in g.graph.node:
        if n.op_type == "MatMulInteger":
            assert init[n.input[1]].data_type == onnx.TensorProto.INT8     # weights really int8
    # every table tensor keeps the dtype the model stores (row-wise int8 tables are uint8 already;
    # fp32/fp16/bf16 tables must not have been quantized by the MLP pass)
    state = model.state_dict()
    tables = [i for i in init if i.startswith("model.embeddings.") and i.removeprefix("model.") in state]
    assert tables
    for t in tables:
        want = onnx.helper.np_dtype_to_tensor_dtype(state[t.removeprefix("model.")].numpy().dtype) \
            if state[t.removeprefix("model.")].dtype != torch.bfloat16 else onnx.TensorProto.BFLOAT16
        assert init[t].data_type == want, t
    assert "MatMul" in ops          # the interaction's bmm and MD's projection stay fp32
    assert_matches_eager(runner, model, "int8-dense")


def test_cuda_target_explains_why_not_here():
    why = get_target("onnx-cuda").unavailable()
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present")
    assert "CUDAExecutionProvider" in why and "onnxruntime-gpu" in why


def test_unloadable_model_file_is_a_rewrite_error(tmp_path, fp32):
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(RewriteError, match="onnxruntime cannot load it"):
        get_target("onnx-cpu").load(tmp_path, fp32[1])


@pytest.fixture(scope="module")
def external_lowered(model, tmp_path_factory):
    """onnx-cpu with every table in external data."""
    out = tmp_path_factory.mktemp("onnx-cpu-external")
    return out, get_target("onnx-cpu").lower(model, checks.example_batch(model), out, external_threshold=0)


@pytest.fixture()
def external(external_lowered, tmp_path, monkeypatch):
    """A copy of ``external_lowered`` whose every external tensor counts as huge-page sized."""
    monkeypatch.setattr(onnx_huge_pages, "HUGE_PAGE_MIN_BYTES", 1)
    shutil.copytree(external_lowered[0], tmp_path / "path")
    return tmp_path / "path", external_lowered[1]


def test_external_initializers_read_from_the_wire_bytes_as_onnx_reads_them(external_lowered):
    path = external_lowered[0] / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    want = [(t.name, t.data_type, tuple(t.dims), {e.key: e.value for e in t.external_data})
            for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(want) >= len(REPRESENTATIONS)
    assert onnx_huge_pages.external_initializers(path.read_bytes()) == want


def test_huge_page_initializers_are_used_in_place_and_match_the_file_path(model, external, monkeypatch):
    out, compiled = external
    runner = get_target("onnx-cpu").load(out, compiled, threads=1)
    _, arrays, buffer = runner.session.huge_pages
    assert len(arrays) >= len(model.embeddings) and buffer is not None
    assert min(a.ctypes.data for a in arrays.values()) % onnx_huge_pages.HUGE_PAGE == 0
    monkeypatch.setattr(onnx_huge_pages, "HUGE_PAGE_MIN_BYTES", 2**62)         # onnxruntime reads the file
    plain = get_target("onnx-cpu").load(out, compiled, threads=1)
    assert plain.session.huge_pages[1] == {}
    gc.collect()                                   # the arrays live as long as the session
    for b in checks.test_batches(model):
        args = (b.dense.numpy(), split_bags_np(b.indices.numpy(), b.offsets.numpy(), len(model.spec.features)))
        np.testing.assert_array_equal(runner(*args), plain(*args))
    # in place, not copied: a row written into the buffer changes the session's output
    b = checks.test_batches(model)[0]
    args = (b.dense.numpy(), split_bags_np(b.indices.numpy(), b.offsets.numpy(), len(model.spec.features)))
    name = next(n for n, a in arrays.items() if n.startswith("model.embeddings.") and a.dtype == np.float32)
    before, table = runner(*args), arrays[name].copy()
    arrays[name][...] += 1.0
    assert not np.array_equal(runner(*args), before)
    arrays[name][...] = table
    np.testing.assert_array_equal(runner(*args), before)


@pytest.mark.parametrize("damage, message", [("delete", "external data file model.onnx.data .* is missing"),
                                             ("truncate", "external data file model.onnx.data is truncated")])
def test_bad_external_data_file_is_a_rewrite_error(external, damage, message):
    out, compiled = external
    data = out / "model.onnx.data"
    if damage == "delete":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    with pytest.raises(RewriteError, match=message):
        get_target("onnx-cpu").load(out, compiled)


def test_bad_external_data_below_the_huge_page_size_is_still_a_rewrite_error(external, monkeypatch):
    monkeypatch.setattr(onnx_huge_pages, "HUGE_PAGE_MIN_BYTES", 2**62)         # onnxruntime reads the file
    (external[0] / "model.onnx.data").unlink()
    with pytest.raises(RewriteError, match="onnxruntime cannot load it"):
        get_target("onnx-cpu").load(*external)


def test_int8_tables_in_huge_pages_match_eager(model, tmp_path, monkeypatch):
    """onnx-cpu-int8's quantizer writes its own external data file; its tables load the same way."""
    monkeypatch.setattr(onnx_huge_pages, "HUGE_PAGE_MIN_BYTES", 1)
    _, runner = lower_and_load(get_target("onnx-cpu-int8"), model, tmp_path, external_threshold=0)
    arrays = runner.session.huge_pages[1]
    assert any(name.startswith("model.embeddings.") for name in arrays)
    assert_matches_eager(runner, model, "int8-dense")
