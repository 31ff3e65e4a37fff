"""The dispatch policies on hand-made latency tables and a fake clock."""

from __future__ import annotations

import numpy as np
import pytest

from rewrite.serving.dispatch import BatchSize, Fixed, LoadAware, PathInfo, levels

MS = 1e-3


def info(name, precision, auc, ms_at_1, ms_at_1024, model="m"):
    return PathInfo(name, name, precision, model, auc, np.array([1.0, 1024.0]), np.array([ms_at_1, ms_at_1024]))


def paths():
    # fp32 on two engines (one better at small, one at large batches), and a cheaper int8 level
    return [info("fp32-a", "fp32", 0.80, 0.2, 8.0), info("fp32-b", "fp32", 0.80, 0.6, 6.0),
            info("int8", "int8-dense", 0.79, 0.1, 2.0)]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_levels_group_engines_and_order_by_accuracy():
    lv = levels(paths())
    assert [[p.name for p in x.paths] for x in lv] == [["fp32-a", "fp32-b"], ["int8"]]
    # no AUC: precision decides
    lv = levels([info("q", "int8-dense", None, 1, 2), info("f", "fp32", None, 1, 2)])
    assert [x.paths[0].name for x in lv] == ["f", "q"]


def test_light_load_uses_the_accurate_level_and_the_engine_for_the_size():
    pol = LoadAware(paths(), 10 * MS, clock=Clock())
    assert pol.choose(1, 0, 0.0).path == "fp32-a"
    assert pol.choose(1000, 0, 0.0).path == "fp32-b"


def test_heavy_load_moves_down_and_comes_back_only_after_calm_and_dwell():
    clock = Clock()
    pol = LoadAware(paths(), 10 * MS, up_after=3, dwell_s=1.0, clock=clock)
    d = pol.choose(1024, 2048, 0.002)               # fp32: 2 + 6 + ~12 ms >> 7 ms
    assert (d.path, d.level) == ("int8", 1)
    # load falls, but inside the hysteresis band (fp32 projection between low and high): stay
    assert pol.choose(256, 0, 0.003).level == 1
    # calm (fp32 would be <= 3.5 ms) but the dwell time has not passed: stay
    for _ in range(5):
        assert pol.choose(64, 0, 0.0).level == 1
    clock.t = 2.0
    assert pol.choose(256, 0, 0.003).level == 1    # a batch in the band resets the calm count
    for _ in range(2):
        assert pol.choose(64, 0, 0.0).level == 1    # up_after = 3 calm batches in a row
    assert pol.choose(64, 0, 0.0).level == 0
    assert pol.switches == 2


def test_nothing_meets_the_target_takes_the_cheapest():
    pol = LoadAware(paths(), 1 * MS, clock=Clock())
    assert pol.choose(1024, 4096, 0.05).path == "int8"


def test_observe_corrects_the_estimate_and_counts_shares():
    pol = Fixed(paths(), "int8")
    for _ in range(20):
        pol.observe("int8", 1024, 4 * 2.0 * MS)     # really 4x slower than compiled
    assert 3.5 < pol.paths["int8"].scale < 4.1
    r = pol.report()
    assert r["paths"]["int8"]["share"] == 1.0 and r["paths"]["int8"]["samples"] == 20 * 1024
    assert r["served_auc_weighted"] == 0.79


def test_batch_size_policy_follows_the_bundle():
    class B:
        def path_for_batch(self, b):
            return "fp32-a" if b < 100 else "fp32-b"
    pol = BatchSize(paths(), B())
    assert pol.choose(5, 10_000, 1.0).path == "fp32-a"
    assert pol.choose(500, 0, 0.0).path == "fp32-b"


def test_a_measured_tail_over_the_target_moves_down_even_when_the_projection_is_fine():
    clock = Clock()
    pol = LoadAware(paths(), 10 * MS, up_after=1, dwell_s=0.0, window=40, clock=clock)

    def answered(n: int, seconds: float, rate: float):
        for _ in range(n):
            clock.t += 1.0 / rate
            pol.observe_request(seconds)

    assert pol.choose(64, 0, 0.0).level == 0       # projections small: the accurate level
    answered(9, 12 * MS, rate=100)                 # too few answered to judge a tail (window / 4)
    assert pol.choose(64, 0, 0.0).level == 0 and pol.tail() is None
    answered(1, 12 * MS, rate=100)
    d = pol.choose(64, 0, 0.0)
    assert (d.path, d.level) == ("int8", 1) and pol.switches == 1
    assert pol.tail() is None and pol.tripped_rate[0] == pytest.approx(100)   # the window restarts
    answered(10, 5 * MS, rate=100)                 # under high (7 ms), over low (3.5 ms): stay
    assert pol.choose(64, 0, 0.0).level == 1
    answered(40, 1 * MS, rate=90)                  # calm, but at the rate where fp32 tripped: stay
    assert pol.choose(64, 0, 0.0).level == 1
    answered(40, 1 * MS, rate=50)                  # calm at half that rate: back up
    assert pol.choose(64, 0, 0.0).level == 0 and pol.switches == 2
    assert pol.report()["recent_p99_ms"] is None
