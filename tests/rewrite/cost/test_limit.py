"""The host limit a bench figure is compared with (rewrite.cost.limit), checked by hand on the
synthetic spec: cache 4 KiB at 10 ns, DRAM at 100 ns, fp32 10 GFLOP/s."""

from __future__ import annotations

import pytest

from rewrite.cost.limit import mlp_dtype, model_work, path_limit
from rewrite.training import table_dlrm
from tests.rewrite.cost.conftest import synthetic_hw

ROWS, DIM, BOTTOM, TOP, N_DENSE = (1000, 64, 8), 16, (32, 16), (24, 1), 13


def hand_flops() -> tuple[float, float]:
    """(MLP FLOPs, interaction FLOPs) per bag of the test model, from its shape."""
    widths = [N_DENSE, *BOTTOM], [(len(ROWS) + 1) * len(ROWS) // 2 + BOTTOM[-1], *TOP]
    mlp = sum(2.0 * a * b for w in widths for a, b in zip(w, w[1:]))
    f = len(ROWS) + 1
    return mlp, 2.0 * f * f * DIM            # the interaction's batched Z Zᵀ


def hand_gather_s(dram_s: float = 100e-9, cache_s: float = 10e-9) -> float:
    """Seconds per bag: each table's lookups hit the cache in proportion to the share of its bytes
    the cache holds (its share of the cache: 1/3, uniform ids), DRAM the rest."""
    total = 0.0
    for rows in ROWS:
        hit = min(1.0, (4096 / len(ROWS)) / (rows * DIM * 4))
        total += hit * cache_s + (1 - hit) * dram_s
    return total


@pytest.fixture(scope="module")
def work():
    return model_work(table_dlrm(list(ROWS), n_dense=N_DENSE, dim=DIM, bottom=BOTTOM, top=TOP))


def test_the_limit_is_gathers_at_the_row_time_plus_flops_at_the_peak(work):
    mlp, interaction = hand_flops()
    assert work.mlp_flops == mlp and work.other_flops == pytest.approx(interaction)
    limit = path_limit(work, synthetic_hw(), "fp32", batch=64)
    assert limit.gather_s == pytest.approx(64 * hand_gather_s())
    pooling = len(ROWS) * DIM                 # a plain table's lookup: DIM adds into its bag
    assert limit.compute_s == pytest.approx(64 * (mlp + interaction + pooling) / 10e9)
    assert limit.seconds == pytest.approx(limit.gather_s + limit.compute_s)
    assert path_limit(work, synthetic_hw(), "fp32", batch=64, lookups_per_bag=3).gather_s == \
        pytest.approx(3 * limit.gather_s)


def test_int8_mlps_use_the_int8_peak_and_the_interaction_stays_fp32(work):
    mlp, interaction = hand_flops()
    hw = synthetic_hw(gemm={"fp32": ((1e6, 5e9), (1e9, 10e9)), "int8": ((1e6, 10e9), (1e9, 40e9))})
    limit = path_limit(work, hw, mlp_dtype("int8-dense", hw), batch=64)
    pooling = len(ROWS) * DIM
    assert limit.compute_s == pytest.approx(64 * (mlp / 40e9 + (interaction + pooling) / 10e9))   # peaks


def test_each_tier_takes_the_faster_of_the_two_gathers(work):
    hw = synthetic_hw(measurements={"engine_tier_row_s": {"dram": 40e-9, "cache": 25e-9}})
    limit = path_limit(work, hw, "fp32", batch=64)
    assert limit.gather_s == pytest.approx(64 * hand_gather_s(dram_s=40e-9, cache_s=10e-9))


@pytest.mark.parametrize("precision, gemm, dtype", [
    ("int8-dense", {"fp32": ((0.0, 1e9),), "int8": ((0.0, 4e9),)}, "int8"),
    ("bf16-dense", {"fp32": ((0.0, 1e9),), "bf16": ((0.0, 2e9),)}, "bf16"),
    ("bf16-dense", {"fp32": ((0.0, 1e9),)}, "fp32"),      # no bf16 arithmetic measured: fp32 bounds it
    ("int8-tables", {"fp32": ((0.0, 1e9),), "int8": ((0.0, 4e9),)}, "fp32"),   # int8 tables, fp32 MLPs
    ("fp32", {"fp32": ((0.0, 1e9),), "bf16": ((0.0, 2e9),)}, "fp32"),
])
def test_the_mlp_arithmetic_follows_the_paths_precision_and_what_was_measured(precision, gemm, dtype):
    assert mlp_dtype(precision, synthetic_hw(gemm=gemm)) == dtype
