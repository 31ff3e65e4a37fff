"""passes.row_index: the narrow int dtypes at their exact boundaries; the padded sorted id list
and its gather-only binary search against a Python dict on random ids (absent ids, the smallest
and the largest included); the gathers it does, counted; the hottest rows against hand-sorted counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from passes.row_index import (SENTINEL, hottest_rows, narrow_int_dtype, narrow_tensor, padded_sorted_ids,
                              sorted_lookup, sorted_lookup_steps)


@pytest.mark.parametrize("lo, hi, dtype", [
    (0, 0, torch.int16), (-2**15, 2**15 - 1, torch.int16),
    (-2**15 - 1, 0, torch.int32), (0, 2**15, torch.int32),
    (-2**31, 2**31 - 1, torch.int32),
])
def test_narrow_int_dtype_boundaries(lo, hi, dtype):
    assert narrow_int_dtype(lo, hi) == dtype
    info = torch.iinfo(dtype)
    assert info.min <= lo and hi <= info.max


@pytest.mark.parametrize("lo, hi", [(0, 2**31), (-2**31 - 1, 0)])
def test_narrow_int_dtype_refuses_beyond_int32(lo, hi):
    with pytest.raises(ValueError) as e:
        narrow_int_dtype(lo, hi)
    assert str(e.value) == f"values in [{lo}, {hi}] do not fit int32"


def test_narrow_tensor_keeps_values():
    for values, dtype in (([-1, 0, 32767], torch.int16), ([-1, 40000], torch.int32), ([], torch.int16)):
        t = narrow_tensor(np.array(values, dtype=np.int64))
        assert t.dtype == dtype and t.tolist() == values


@pytest.mark.parametrize("k", [1, 2, 3, 8, 9, 100, 1000])
def test_sorted_lookup_matches_a_dict(k):
    rng = np.random.default_rng(k)
    largest = SENTINEL - 1                                   # the largest id a table can have
    others = np.unique(rng.integers(1, largest, size=2 * k))
    ids = rng.permutation(np.concatenate([[0, largest], others])[:k])    # 0 first, then the largest
    padded = padded_sorted_ids(ids)
    m = len(padded)
    assert padded.dtype == torch.int32 and m & (m - 1) == 0 and m >= k and (m == 1 or m // 2 < k)
    assert padded[:k].tolist() == sorted(ids.tolist()) and (padded[k:] == SENTINEL).all()

    slot_of = {int(i): s for s, i in enumerate(sorted(ids.tolist()))}
    absent = np.setdiff1d(rng.integers(0, largest, size=200), ids)
    queries = np.concatenate([ids, absent, ids + 1, ids - 1, [0, 1, largest, largest - 1]])
    queries = queries[(queries >= 0) & (queries <= largest)]
    slot, found = sorted_lookup(padded, torch.from_numpy(queries))
    assert found.tolist() == [int(q) in slot_of for q in queries]
    assert slot[found].tolist() == [slot_of[int(q)] for q in queries if int(q) in slot_of]
    assert ((slot >= 0) & (slot < m)).all()                  # every probe stayed inside the list


class CountGathers(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.gathers = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.gathers += func in (torch.index_select, torch.Tensor.index_select)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("length, steps", [(1, 1), (2, 2), (4, 3), (64, 7), (1024, 11)])
def test_sorted_lookup_steps_counts_the_gathers(length, steps):
    padded = padded_sorted_ids(np.arange(length) * 3)
    with CountGathers() as mode:
        sorted_lookup(padded, torch.tensor([0, 5, 3 * (length - 1)]))
    assert sorted_lookup_steps(length) == steps == mode.gathers


COUNTS = np.array([5, 0, 7, 5, 1, 7, 0, 2])      # sorted by count, ties by id: 2, 5, 0, 3, 7, 4


@pytest.mark.parametrize("kwargs, expected", [
    ({"rows": 3}, [2, 5, 0]),
    ({"rows": 100}, [2, 5, 0, 3, 7, 4]),                   # never the untouched rows 1 and 6
    ({"rows": 0}, []),
    ({"coverage": 0.01}, [2]),
    ({"coverage": 14 / 27}, [2, 5]),                     # 7 + 7 of 27 lookups: exactly reached
    ({"coverage": 15 / 27}, [2, 5, 0]),
    ({"coverage": 1.0}, [2, 5, 0, 3, 7, 4]),
])
def test_hottest_rows_by_count_and_by_coverage(kwargs, expected):
    assert hottest_rows(COUNTS, **kwargs).tolist() == expected


def test_hottest_rows_of_an_untouched_table_is_empty():
    assert hottest_rows(np.zeros(5, dtype=np.int64), rows=3).tolist() == []
    assert hottest_rows(np.zeros(5, dtype=np.int64), coverage=0.5).tolist() == []
