import json
import shutil

import pytest
import torch

from rewrite.artifact import FORMAT_VERSION, open_bundle, sha256_file
from rewrite.dispatch import measured_ranges
from rewrite.bundling import compile_model
from rewrite.core.errors import RewriteError
from rewrite.core.model_file import load
from tests.bundles import LATENCY_SIZES, TARGETS, make_bundle
from tests.representations import composite_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("artifact"))


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(built[1], dst)
    return dst


def test_manifest_records_everything(built):
    source, out, manifest = built
    m = json.loads((out / "manifest.json").read_text())
    assert m == json.loads(json.dumps(manifest))
    assert m["format_version"] == FORMAT_VERSION
    assert m["source"] == {"path": str(source), "sha256": sha256_file(source), "format": None}
    assert {"python", "torch", "onnx", "onnxruntime", "numpy"} <= set(m["versions"])
    assert m["model"] == json.loads(json.dumps(composite_model().full_spec()))
    assert list(m["paths"]) == TARGETS
    for name, p in m["paths"].items():
        assert p["target"] == name and p["verification"]["passed"]
        assert p["verification"]["max_abs_prob_error"] <= p["verification"]["tolerance"]
        assert set(p["verification"]["checks"]) == {"ragged-1", "ragged-7", "ragged-1024", "all-empty-4"}
        assert set(p["latency_ms"]) == {str(b) for b in LATENCY_SIZES}
        assert all(f["sha256"] == sha256_file(out / f["path"]) for f in p["files"])
        assert p["footprint_bytes"] == sum((out / f["path"]).stat().st_size for f in p["files"])
        assert p["embedding_bytes"] == composite_model().embedding_bytes()
        assert p["representations"]["t4_qr-mult"].startswith("qr mult c=4")
    assert m["paths"]["onnx-cpu"]["files"][0]["path"] == "onnx-cpu/model.onnx"
    ranges = m["dispatch"]["ranges"]
    assert ranges[0]["min_batch"] == 1 and ranges[-1]["max_batch"] is None
    assert all(a["max_batch"] + 1 == b["min_batch"] for a, b in zip(ranges, ranges[1:]))


def test_reference_is_the_original_model_in_native_format(built):
    _, out, _ = built
    ref = load(out / "reference/model.safetensors")
    orig = composite_model()
    for k, v in orig.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v)


def test_dispatch_policy_picks_the_fastest_per_range():
    lat = {"a": {1: 0.1, 64: 1.0, 512: 9.0, 2048: 30.0}, "b": {1: 0.3, 64: 0.8, 512: 5.0, 2048: 31.0}}
    d = measured_ranges(lat, None)
    # crossovers at the geometric means: sqrt(1*64)=8, sqrt(64*512)=181, sqrt(512*2048)=1024
    assert d["ranges"] == [{"min_batch": 1, "max_batch": 8, "path": "a"},
                           {"min_batch": 9, "max_batch": 1024, "path": "b"},
                           {"min_batch": 1025, "max_batch": None, "path": "a"}]
    assert d["default_path"] == "a"
    assert measured_ranges({}, "x") == {"measured_batch_sizes": [], "ranges": [], "default_path": "x"}


def test_tampered_file_is_refused(copy):
    f = copy / "onnx-cpu/model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(RewriteError, match=r"onnx-cpu/model.onnx does not match its sha256"):
        open_bundle(copy)


def test_tampered_reference_is_refused(copy):
    with open(copy / "reference/model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RewriteError, match="reference/model.safetensors does not match its sha256"):
        open_bundle(copy)


def test_partial_bundle_is_refused(copy):
    (copy / "torch/model.safetensors").unlink()
    with pytest.raises(RewriteError, match=r"missing file torch/model.safetensors .*partial bundle"):
        open_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(RewriteError, match="a directory with no manifest.json; not a bundle, or a partial one"):
        open_bundle(copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=FORMAT_VERSION + 1), "newer than this toolkit's"),
    (lambda m: m.update(format="other"), "format 'other' is not 'dlrm-rewrite-bundle'"),
    (lambda m: m.pop("dispatch"), "malformed manifest"),
    (lambda m: m["paths"]["torch"].pop("verification"), "malformed manifest"),
    (lambda m: m["paths"]["torch"]["files"][0].update(path="../../etc/passwd"), "lies outside the bundle"),
])
def test_bad_manifest_is_refused(copy, edit, message):
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RewriteError, match=message):
        open_bundle(copy)


def test_existing_output_refused_without_force_and_replaced_with_it(built, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = composite_model()
    with pytest.raises(RewriteError, match="already exists \\(use --force"):
        compile_model(model, out, ["torch"], latency_sizes=())
    with pytest.raises(RewriteError, match="is not a bundle; refusing to replace it even with --force"):
        compile_model(model, out, ["torch"], force=True, latency_sizes=())
    assert (out / "keep.txt").read_text() == "mine"
    shutil.copytree(built[1], tmp_path / "c")
    compile_model(model, tmp_path / "c", ["torch"], force=True, latency_sizes=())
    assert list(open_bundle(tmp_path / "c").paths) == ["torch"]


def test_failed_lowering_leaves_nothing_behind(tmp_path):
    with pytest.raises(RewriteError, match="fbgemm-int8 cannot lower table|fbgemm_gpu does not load"):
        compile_model(composite_model(), tmp_path / "out", ["torch", "fbgemm-int8"], latency_sizes=())
    assert list(tmp_path.iterdir()) == []            # no bundle, no .tmp-* sibling
