import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import targets.base
from rewrite.artifact import open_bundle
from rewrite.bench import calls_per_round
from rewrite.cli import main
from rewrite.core.model_file import save
from rewrite.cost.hardware import load_hardware
from rewrite.cost.limit import model_work, path_limit
from rewrite.formats import load
from tests.bundles import make_bundle
from tests.representations import composite_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("cli"))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_compile_verify_inspect(tmp_path):
    src = tmp_path / "m.safetensors"
    save(composite_model(), src)
    r = run("compile", src, "-o", tmp_path / "b", "--target", "torch", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert list(out["paths"]) == ["torch"] and out["paths"]["torch"]["verification"]["passed"]
    r = run("verify", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["paths"]["torch"]["verification"]["max_abs_prob_error"] == 0.0
    r = run("inspect", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["schema"] == "inspect/1" and info["format"] == "bundle" and info["default_path"] == "torch"
    assert info["embedding_bytes"] == composite_model().embedding_bytes()
    assert len(info["tables"]) == len(composite_model().embeddings) and info["paths"]["torch"]["verified"]
    assert run("inspect", src).exit_code == 0          # checkpoints still inspect as before


@pytest.mark.slow
def test_default_target_auto_compiles_every_usable_target_and_skips_the_rest_by_name(tmp_path):
    """No --target: every target that runs here and accepts the model; a refusal (the composite
    model's bf16 table in tvm-llvm) or a missing device is recorded, never fatal.  The fused
    engine takes every representation of the composite model."""
    from rewrite.bundling import unavailable_here
    from targets.base import TARGETS

    src = tmp_path / "m.safetensors"
    save(composite_model(), src)
    r = run("compile", src, "-o", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    skipped = out["skipped_targets"]
    assert set(out["paths"]) | set(skipped) == set(TARGETS.names())
    assert all(skipped[name] == why for name, why in unavailable_here().items())
    fast = {"torch-fast", "torch-fast-int8"} - set(unavailable_here())
    assert {"torch", "onnx-cpu"} | fast <= set(out["paths"])   # tvm-llvm refuses its bf16 table: skipped by name
    assert all(p["verification"]["passed"] for p in out["paths"].values())
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["skipped_targets"] == skipped and all((tmp_path / "b" / name).is_dir() for name in fast)
    r = run("compile", src, "-o", tmp_path / "c", "--target", "auto", "--target", "torch")
    assert r.exit_code == 2 and "--target auto stands alone" in r.output


def test_verify_on_data_reports_auc(built, tmp_path):
    from rewrite.core.synthetic import write_npz

    model = composite_model()
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    rng = torch.Generator().manual_seed(0)
    n = 600
    cat = torch.stack([torch.randint(0, r, (n,), generator=rng) for r in rows], 1).numpy()
    dense = torch.randint(0, 50, (n, 5), generator=rng).numpy()
    write_npz(tmp_path / "d.npz", dense, cat, (torch.rand(n, generator=rng) < 0.3).int().numpy())
    r = run("verify", built[1], "--data", tmp_path / "d.npz", "--json")
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)["paths"]["onnx-cpu"]["verification"]
    assert "data-0" in v["checks"] and abs(v["auc"] - v["reference_auc"]) < 1e-4   # ties may rank differently


def test_verify_failure_exits_1(built, monkeypatch):
    monkeypatch.setitem(targets.base.TOLERANCE, "fp32", 0.0)   # onnx-cpu differs from eager by ~1e-8
    r = run("verify", built[1])
    assert r.exit_code == 1
    assert "FAILED" in r.output and "exceeds the tolerance 0" in r.output
    assert "error: " in r.output and "path(s) failed: onnx-cpu" in r.output


@pytest.mark.parametrize("args, message", [
    (["--target", "tvm-gpu"], "error: unknown target 'tvm-gpu' (known: "),
    (["--target", "onnx-cuda"], "error: target 'onnx-cuda' cannot run here: onnxruntime"),
    (["--target", "torch", "--target", "torch"], "error: --target: each target once"),
])
def test_bad_targets_exit_2_and_write_nothing(built, tmp_path, args, message):
    r = run("compile", built[0], "-o", tmp_path / "b", *args)
    assert r.exit_code == 2 and message in r.output
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_tampered_bundle_exit_2(built, tmp_path):
    r = run("compile", built[0], "-o", built[1], "--target", "torch")
    assert r.exit_code == 2 and "already exists (use --force" in r.output
    shutil.copytree(built[1], tmp_path / "b")
    with open(tmp_path / "b/torch/model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x13")
    for cmd in ("verify", "inspect", "bench"):
        r = run(cmd, tmp_path / "b")
        assert r.exit_code == 2 and "torch/model.safetensors does not match its sha256" in r.output, cmd


def test_targets_lists_what_runs_and_why_not():
    r = run("targets", "--json")
    assert r.exit_code == 0
    t = {x["name"]: x for x in json.loads(r.stdout)["targets"]}
    assert {"torch", "torch-bf16", "torch-compile", "onnx-cpu", "onnx-cpu-int8", "onnx-cuda", "fbgemm-int8"} <= set(t)
    assert t["onnx-cpu"]["available"] and t["torch"]["why_not"] is None
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert not t["onnx-cuda"]["available"] and "CUDAExecutionProvider" in t["onnx-cuda"]["why_not"]


def test_targets_and_compile_at_a_forced_lower_tier(monkeypatch, tmp_path):
    """REWRITE_ISA=avx2 on any host of that tier or above: what an AVX2-only host sees."""
    from rewrite.core import isa

    try:
        isa.check_tier("avx2")
    except Exception as e:
        pytest.skip(str(e))
    monkeypatch.setenv(isa.ENV, "avx2")
    r = run("targets", "--json")
    d = json.loads(r.stdout)
    assert d["host"]["tier"] == "avx2"
    t = {x["name"]: x for x in d["targets"]}
    assert t["torch-fast"]["available"] and t["torch-fast-int8"]["available"]
    src = tmp_path / "m.safetensors"
    from tests.helpers import small_model

    save(small_model(rows=(100, 30, 7)), src)
    r = run("compile", src, "-o", tmp_path / "b", "--target", "torch-fast", "--target", "torch-fast-int8", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert all(p["verification"]["passed"] for p in out["paths"].values())
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["host"]["tier"] == "avx2"


def rewrite_at_tier(tier: str, *args, code: str | None = None):
    """``rewrite *args`` (or ``python -c code``) in a fresh process started with REWRITE_ISA=tier,
    so torch and oneDNN are capped there for its whole life, as on a host of that tier."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, REWRITE_ISA=tier)
    env.pop("ATEN_CPU_CAPABILITY", None)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "rewrite.cli", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def skip_unless_int_mm_saturates(tier: str) -> str:
    """The reason torch._int_mm is inexact in a process started at ``tier``; skips where it is exact
    (torch's oneDNN at that cap computes exact int8 sums on this host)."""
    from rewrite.core import isa

    try:
        isa.check_tier(tier)
    except Exception as e:
        pytest.skip(str(e))
    probe = rewrite_at_tier(tier, code="from targets.native.int8_kernels import int_mm_inexact as f; print(f() or '')")
    assert probe.returncode == 0, probe.stderr
    if not probe.stdout.strip():
        pytest.skip(f"torch._int_mm is exact in a process started with REWRITE_ISA={tier} on this host")
    return probe.stdout.strip()


@pytest.mark.slow
def test_torch_fast_int8_refuses_by_name_where_its_int8_mlps_would_saturate(tmp_path):
    """REWRITE_ISA=generic from process start caps oneDNN at SSE4.1, whose int8 GEMM sums pairs in
    saturating s16 (torch._int_mm inexact), and no one-call int8 kernel runs at that tier: every
    MLP would be Int8Mlp, so torch-fast-int8 says why in `rewrite targets`, a compile naming it
    exits 2 and writes nothing, and --target auto skips it with that reason."""
    inexact = skip_unless_int_mm_saturates("generic")
    r = rewrite_at_tier("generic", "targets", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    t = {x["name"]: x for x in d["targets"]}
    assert d["host"]["tier"] == "generic" and t["torch-fast"]["available"]
    why = t["torch-fast-int8"]["why_not"]
    assert not t["torch-fast-int8"]["available"] and why.endswith(f"and {inexact}")
    assert why.startswith("its int8 MLPs would be one torch._int_mm per layer (VNNI MLP: ")
    assert "AVX2 int8 MLP: avx2, fma is above the forced ISA tier 'generic' (REWRITE_ISA)" in why
    src = tmp_path / "m.safetensors"
    from tests.helpers import small_model

    save(small_model(rows=(100, 30, 7)), src)
    r = rewrite_at_tier("generic", "compile", src, "-o", tmp_path / "b", "--target", "torch-fast-int8")
    assert r.returncode == 2 and f"error: target 'torch-fast-int8' cannot run here: {why}" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    code = ("import json; from rewrite.bundling import resolve_targets, unavailable_here; "
            "print(json.dumps([[t.name for t in resolve_targets(['auto'])], unavailable_here()]))")
    r = rewrite_at_tier("generic", code=code)                # what compile --target auto records
    assert r.returncode == 0, r.stderr
    auto, skipped = json.loads(r.stdout)
    assert "torch-fast" in auto and "torch-fast-int8" not in auto and skipped["torch-fast-int8"] == why


@pytest.mark.slow
def test_torch_fast_int8_refuses_a_model_whose_mlp_falls_through_to_a_saturating_int_mm(tmp_path):
    """At the avx2 tier (oneDNN capped at AVX2: torch._int_mm inexact) the AVX2 int8 kernel serves
    MLPs whose int8 layers are multiples of 8 wide; a top MLP with a 12-wide layer would fall
    through to Int8Mlp, so compiling that model for torch-fast-int8 exits 2 naming the MLP and
    writes nothing (with --target auto, the same RewriteError is recorded as the skip reason)."""
    inexact = skip_unless_int_mm_saturates("avx2")
    from rewrite.training import table_dlrm

    src = tmp_path / "m.safetensors"
    save(table_dlrm([100, 30, 7], dim=16, bottom=(32, 16), top=(16, 12, 1)).eval(), src)
    r = rewrite_at_tier("avx2", "compile", src, "-o", tmp_path / "b", "--target", "torch-fast-int8")
    assert r.returncode == 2, r.stderr
    assert ("error: torch-fast-int8 cannot run this model here: the top MLP: its int8 MLPs would be one "
            "torch._int_mm per layer (VNNI MLP: ") in r.stderr
    assert f"AVX2 int8 MLP: layer widths [12] are not multiples of 8), and {inexact}" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.slow
def test_bench_json(built):
    r = run("bench", built[1], "--batch-sizes", "1,8", "--rounds", "1", "--hardware", "zen4", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    rows = {(x["path"], x["batch"]): x for x in d["results"]}
    # each figure as a share of the host's limit: the limit of the path's own model and arithmetic
    hw, bundle = load_hardware("zen4"), open_bundle(built[1])
    assert d["limit"]["hardware"] == "zen4" and "of_limit = limit / p50" in d["limit"]["method"]
    for (path, b), x in rows.items():
        model = load(bundle.reference_file(None if path == "torch-eager-fp32" else path))
        assert x["mlp_dtype"] == "fp32"
        assert x["limit_ms"] == pytest.approx(path_limit(model_work(model), hw, "fp32", b).seconds * 1e3)
        assert x["of_limit"] == pytest.approx(x["limit_ms"] / x["p50_ms"])
    assert d["host"]["tier"] in ("generic", "avx2", "avx512", "amx")
    assert set(rows) == {(p, b) for p in ("torch-eager-fp32", "onnx-cpu", "torch") for b in (1, 8)}
    for x in rows.values():
        assert x["samples_per_s"] > 0 and x["p99_ms"] >= x["p50_ms"] > 0
        assert x["baseline_p50_ms"] == rows[("torch-eager-fp32", x["batch"])]["p50_ms"]
        assert x["max_abs_prob_diff_vs_baseline"] < 1e-5
    assert rows[("onnx-cpu", 8)]["calls"] == calls_per_round(8) == 256   # one round of fresh batches
    # the composite model has QR / MD tables, so fbgemm's contender is absent with the reason
    assert "fbgemm-int8" in d["absent"] and ("cannot lower table" in d["absent"]["fbgemm-int8"]
                                             or "does not load" in d["absent"]["fbgemm-int8"])


def test_bench_rejects_bad_batch_sizes(built):
    r = run("bench", built[1], "--batch-sizes", "1,x")
    assert r.exit_code == 2 and "--batch-sizes: expected comma-separated integers" in r.output


def test_bench_rejects_an_unknown_hardware_spec_before_it_runs(built):
    r = run("bench", built[1], "--hardware", "no-such-cpu")
    assert r.exit_code == 2 and "--hardware: unknown 'no-such-cpu'" in r.output
