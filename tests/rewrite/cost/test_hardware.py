"""Presets, user JSON specs, the cpu-local cache, and the real measurement (slow)."""

import json

import pytest

from rewrite.core import isa
from rewrite.cost import microbench as mb
from rewrite.cost.hardware import PRESETS, cache_dir, cpu_local, load_hardware
from rewrite.cost.types import HardwareSpec
from rewrite.core.errors import RewriteError
from tests.rewrite.cost.conftest import synthetic_hw


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_complete_and_round_trip(name):
    hw = load_hardware(name)
    assert hw.placeable and hw.gemm["fp32"][0][1] > 0 and hw.source == "spec"
    assert HardwareSpec.from_json(json.loads(json.dumps(hw.to_json()))) == hw


def test_preset_numbers_follow_their_sources():
    a100 = load_hardware("a100")
    assert a100.tier("hbm").capacity == 80 * 2**30 and a100.tier("hbm").bandwidth == 2039e9
    assert a100.gemm["bf16"][0][1] == 312e12
    spr = load_hardware("sapphirerapids")                  # 56 cores x 2.0 GHz x 64 FLOP/cycle
    assert spr.gemm["fp32"][0][1] == pytest.approx(56 * 2.0e9 * 64)
    assert spr.tier("dram").bandwidth == pytest.approx(307.2e9)
    assert [t.name for t in load_hardware("accel-sram").placeable] == ["sram", "host"]


def test_user_json_spec(tmp_path):
    path = tmp_path / "box.json"
    path.write_text(json.dumps(synthetic_hw(name="box").to_json()))
    assert load_hardware(str(path)).name == "box"


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a hardware spec is a JSON object"),
    ('{"name": "x"}', "not a hardware spec (KeyError: 'tiers')"),
])
def test_bad_user_spec_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(RewriteError, match="bad.json") as e:
        load_hardware(str(path))
    assert message in str(e.value)


def test_missing_or_unknown_hardware():
    with pytest.raises(RewriteError, match="no such hardware spec file"):
        load_hardware("/nonexistent/box.json")
    with pytest.raises(RewriteError, match="--hardware: unknown 'tpu9000' \\(choose cpu-local, a100"):
        load_hardware("tpu9000")


def test_cache_sizes_from_a_sysfs_tree(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                             (2, "Unified", "1024K"), (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert mb.cache_sizes(tmp_path) == {"L1": 48 * 1024, "L2": 1 << 20, "L3": 32 << 20}


def test_cpu_local_reads_its_cache_without_measuring(monkeypatch):
    import rewrite.cost.hardware as hardware

    spec = synthetic_hw(name="cpu-local", source="measured", threads=1)
    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / "hardware.json").write_text(json.dumps({"version": hardware.HARDWARE_CACHE_VERSION,
                                                            "machines": {hardware.cache_key(1): spec.to_json()}}))

    def measure(*_):
        raise AssertionError("cpu_local measured although the cache holds this machine")

    monkeypatch.setattr(hardware, "measure_cpu", measure)
    assert cpu_local() == spec
    (cache_dir() / "hardware.json").unlink()


@pytest.mark.slow
def test_cpu_local_is_measured_cached_and_plausible():
    hw = cpu_local(refresh=True, progress=False)
    assert hw.source == "measured" and hw.threads == 1
    assert [t.name for t in hw.tiers] == ["l2", "llc", "dram"]
    l2, llc, dram = hw.tiers
    assert l2.managed and llc.managed and not dram.managed
    # a random row from DRAM costs more than one from L2; streaming DRAM is slower than L2
    assert dram.access_time > l2.access_time and dram.bandwidth < l2.bandwidth
    assert set(hw.gemm) >= {"fp32"} and all(r > 1e8 for _, r in hw.gemm["fp32"])
    assert 1e-8 < hw.call_overhead < 1e-4
    assert load_hardware("cpu-local", progress=False) == hw        # second call: the cache
    # int8 is measured on the engine's own kernel for the tier; bf16 only where the CPU computes it
    assert hw.measurements["isa_tier"] == isa.active_tier()
    assert set(hw.gemm) >= {"fp32", "int8"} and ("bf16" in hw.gemm) == isa.has("avx512_bf16")
    # the host limit's random rows: the fast engine's gather too, per tier
    engine = hw.measurements["engine_tier_row_s"]
    assert set(engine) == {"l2", "llc", "dram"} and all(0 < s < 1e-6 for s in engine.values())
    assert engine["dram"] > engine["l2"]


INT8_KERNEL = {"avx512": "VnniMlp", "amx": "VnniMlp", "avx2": "Avx2Int8Mlp", "generic": "Int8Mlp"}


def test_int8_limit_is_measured_on_each_tiers_own_kernel(isa_tier):
    rate, kernel = mb.int8_kernel_throughput(256, 128, 128)
    expected = INT8_KERNEL[isa_tier]
    if expected == "VnniMlp" and not isa.has("avx512_vnni"):
        expected = "Avx2Int8Mlp"
    assert kernel == expected and rate > 1e8


def test_the_engines_gather_is_measured_at_each_tier(isa_tier):
    rows_per_s = mb.engine_gather_rate(1 << 20)
    assert 1e6 < rows_per_s < 1e10
