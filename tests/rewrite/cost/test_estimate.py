"""Estimators on the synthetic spec (conftest.synthetic_hw), against hand-computed numbers."""

import numpy as np
import pytest
import torch
from torch import nn

from rewrite.cost.estimate import Estimator, TableStats, coverage_curve, dense_facts, rep_facts
from rewrite.cost.types import MemoryTier
from rewrite.core.embedding import Representation, TableBag
from rewrite.core.model import ModelSpec, RecModel
from tests.rewrite.cost.conftest import synthetic_hw


class Doubled(Representation):
    """A representation with a graph small enough to count by hand: gather, then x2."""

    kind = "doubled-test"

    def __init__(self, rows, dim):
        super().__init__()
        self.rows, self.dim, self.pooling = rows, dim, "sum"
        self.w = nn.Parameter(torch.ones(rows, dim))

    def forward(self, indices, offsets):
        return self.w.index_select(0, indices) * 2.0

    def bytes_per_lookup(self):
        return self.dim * 4

    def flops_per_lookup(self):
        return float(self.dim)


class Untraceable(Doubled):
    def forward(self, indices, offsets):
        if indices.sum() > 0:          # data-dependent control flow: fx cannot trace it
            return self.w.index_select(0, indices)
        return self.w[:0]


# 1024 rows: the 64 hot rows take 15 lookups each (960), the 960 cold rows 1 each (960).
HOT = np.array([15] * 64 + [1] * 960)


def test_rep_facts_are_read_off_the_graph():
    f = rep_facts(Doubled(1024, 16))
    assert f.source == "fx"
    assert f.gathers == ((64.0, 1024 * 64.0, 1.0),)        # one 64 B row from a 64 KiB tensor
    assert f.ops == 2                                       # index_select, mul
    assert f.traffic == (128.0, 0.0, 0.0)                   # two [n, 16] fp32 outputs per lookup
    assert f.scatter == (0.0, 0.0, 0.0)
    assert f.flops_per_lookup == 16.0


def test_table_facts_gather_one_row_and_scatter_it_into_its_bag():
    f = rep_facts(TableBag(1000, 16, weight=torch.zeros(1000, 16)))
    assert f.gathers == ((64.0, 64000.0, 1.0),)
    assert f.scatter[0] == 64.0                             # segment_sum reads each looked-up row


def test_untraceable_representation_falls_back_to_its_contract():
    f = rep_facts(Untraceable(1024, 16))
    assert f.source == "contract"
    assert f.gathers == ((64.0, 1024 * 64.0 * 1.0, 1.0),)


def test_coverage_curve():
    cov = coverage_curve(HOT)
    assert cov(1 / 16) == 0.5 and cov(1.0) == 1.0 and cov(0.0) == 0.0
    assert coverage_curve(None)(0.25) == 0.25               # uniform without a profile


def test_hot_rows_hit_in_cache():
    est = Estimator(synthetic_hw())
    hot = TableStats(coverage=coverage_curve(HOT))
    # 4 KiB cache holds 1/16 of a 64 KiB tensor = the 64 hot rows = half the lookups.
    assert est.served("dram", 65536, hot) == [("cache", 0.5), ("dram", 0.5)]
    assert est.served("dram", 65536, TableStats()) == [("cache", 1 / 16), ("dram", 15 / 16)]
    # a quarter of the cache: 16 rows = 240 / 1920 of the lookups
    assert est.served("dram", 65536, TableStats(cache_share=0.25, coverage=coverage_curve(HOT))) == \
        [("cache", 0.125), ("dram", 0.875)]
    assert est.served("dram", 2048, hot) == [("cache", 1.0), ("dram", 0.0)]   # fits whole


def test_two_cache_levels_cascade():
    hw = synthetic_hw(tiers=(MemoryTier("l1", 1024, 200e9, 2e-9, 1.0, True),
                             MemoryTier("cache", 4096, 100e9, 10e-9, 1.0, True),
                             MemoryTier("dram", 1 << 30, 10e9, 100e-9, 1.0)))
    served = Estimator(hw).served("dram", 65536, TableStats(coverage=coverage_curve(HOT)))
    assert served == [("l1", 0.125), ("cache", 0.375), ("dram", 0.5)]


def test_table_terms_by_hand():
    est = Estimator(synthetic_hw())
    facts = rep_facts(Doubled(1024, 16))
    stats = TableStats(lookups_per_bag=2.0, coverage=coverage_curve(HOT))
    gather, compute, traffic, scatter, calls = est.terms_table(facts, "dram", stats, batch=100)
    n = 200                                                  # 100 bags x 2 lookups
    assert gather == pytest.approx(n * (0.5 * 10e-9 + 0.5 * 100e-9))   # 11 us: latency-bound rows
    assert compute == pytest.approx(n * 16 / 10e9)           # 0.32 us
    assert traffic == pytest.approx(n * 128 / 100e9)         # 0.256 us at the cache's bandwidth
    assert scatter == 0.0
    assert calls == pytest.approx(2 * 1e-6)
    cost = Estimator(synthetic_hw(), theta=(2.0, 1.0, 1.0, 1.0, 0.0), source="calibrated") \
        .table_cost(facts, "dram", stats, 100)
    assert cost.gather == pytest.approx(2 * gather) and cost.calls == 0.0
    assert cost.source == "calibrated"


def test_dense_facts_and_terms_by_hand():
    spec = ModelSpec(n_dense=4, bottom=(6, 8), top=(5, 1), features=(("f0", "a"), ("f1", "b")))
    model = RecModel(spec, {"a": TableBag(10, 8, weight=torch.zeros(10, 8)),
                            "b": TableBag(20, 8, weight=torch.zeros(20, 8))})
    facts = dense_facts(model)
    # Linear 4->6, 6->8, (8 + 3 pairs)->5, 5->1: 2*in*out per bag; bmm [3,8]x[8,3]: 2*3*8*3.
    assert sorted(f for _, f in facts.gemms) == [10.0, 48.0, 96.0, 110.0, 144.0]
    terms = Estimator(synthetic_hw()).terms_dense(facts, 1000)
    assert terms[1] == pytest.approx(1000 * 408 / 10e9)
    assert terms[0] == 0.0 and terms[3] == 0.0
    assert terms[4] == pytest.approx(facts.ops * 1e-6)
