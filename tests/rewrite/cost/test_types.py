"""HardwareSpec / MemoryTier / Cost / Footprint: hand-computed numbers and JSON errors."""

import json

import pytest

from rewrite.cost.types import Cost, Footprint, HardwareSpec, MemoryTier
from rewrite.core.errors import RewriteError
from tests.rewrite.cost.conftest import synthetic_hw


def test_row_time_is_latency_or_bandwidth_bound():
    t = MemoryTier("dram", 1 << 30, 10e9, 100e-9, parallelism=4)
    assert t.access_time == pytest.approx(25e-9)                 # 100 ns / 4 in flight
    assert t.row_time(64) == pytest.approx(25e-9)                # 64 B / 10 GB/s = 6.4 ns < 25 ns
    assert t.row_time(1024) == pytest.approx(1024 / 10e9)        # 16 lines: 102.4 ns > 25 ns
    assert t.row_time(65) == pytest.approx(25e-9)                # 2 lines: 12.8 ns < 25 ns
    assert t.row_time(0) == 0.0


def test_gemm_throughput_interpolates_log_linearly_and_clamps():
    hw = synthetic_hw(gemm={"fp32": ((1e6, 1e9), (1e8, 1e11))})
    assert hw.gemm_throughput("fp32", 1e5) == 1e9                # clamped below
    assert hw.gemm_throughput("fp32", 1e9) == 1e11               # clamped above
    assert hw.gemm_throughput("fp32", 1e7) == pytest.approx(1e10)   # log-midpoint
    assert hw.gemm_throughput("int8", 1e7) == pytest.approx(1e10)   # unknown dtype: fp32


def test_cost_adds_term_by_term_and_totals():
    a = Cost(1.0, 2.0, 3.0, 4.0, 5.0, source="calibrated")
    b = Cost(0.5, 0.5, 0.5, 0.5, 0.5, source="calibrated")
    s = a + b
    assert s.terms() == (1.5, 2.5, 3.5, 4.5, 5.5) and s.total == 17.5 and s.source == "calibrated"
    assert (a + Cost(source="estimated")).source == "estimated"   # mixed sources are estimates
    assert s.to_json()["seconds"] == 17.5 and s.to_json()["gather_s"] == 1.5


def test_footprint_fits_per_tier():
    hw = synthetic_hw()
    fp = Footprint({"dram": 100}) + Footprint({"dram": 50, "host": 0})
    assert fp.bytes == {"dram": 150, "host": 0} and fp.total == 150
    assert fp.fits_in(hw)
    assert not Footprint({"dram": (1 << 30) + 1}).fits_in(hw)
    assert not Footprint({"hbm": 1}).fits_in(hw)                  # a tier the device lacks
    assert Footprint({"a": 10, "b": 5}).fits_in({"a": 10, "b": 5})


def test_spec_json_round_trip():
    hw = synthetic_hw(gemm={"fp32": ((1e6, 1e9), (1e8, 1e11)), "int8": ((0.0, 4e10),)})
    again = HardwareSpec.from_json(json.loads(json.dumps(hw.to_json())))
    assert again == hw


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("tiers"), "not a hardware spec (KeyError: 'tiers')"),
    (lambda d: d.update(bogus=1), "unknown key(s) bogus"),
    (lambda d: d["tiers"][1].update(bandwidth=0), "tier dram: capacity, bandwidth, latency and parallelism must be positive"),
    (lambda d: d["gemm"].pop("fp32"), "gemm throughput needs an fp32 entry"),
    (lambda d: d["tiers"].pop(1), "needs at least one memory tier that holds data"),
])
def test_spec_json_errors_name_the_problem(mutate, message):
    d = synthetic_hw().to_json()
    mutate(d)
    with pytest.raises(RewriteError, match="my.json") as e:
        HardwareSpec.from_json(d, where="my.json")
    assert message in str(e.value)


def test_unknown_tier_is_an_error():
    with pytest.raises(RewriteError, match="no memory tier 'hbm'"):
        synthetic_hw().tier("hbm")
