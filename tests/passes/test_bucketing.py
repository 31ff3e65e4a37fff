"""passes.bucketing: BucketOptions' defaults are dlrm's --qr-threshold rule (only tables with more
than 200 rows) and its refusals name the bad value, directly and through the passes that share it."""

from __future__ import annotations

import pytest

import passes
from passes.bucketing import DLRM_THRESHOLD, BucketOptions
from rewrite.core.errors import RewriteError
from rewrite.core.pass_contract import parse_pass
from rewrite.pass_manager import apply
from tests.pass_helpers import small_model


def test_defaults_are_dlrms_threshold_plus_one():
    cfg = BucketOptions()
    assert DLRM_THRESHOLD == 200                   # dlrm_s_pytorch.py: --qr-threshold=200, rows > 200
    assert (cfg.min_rows, cfg.collisions, cfg.max_error) == (201, 4, 0.9)
    assert not cfg.selects("t", 200) and cfg.selects("t", 201)


@pytest.mark.parametrize("kwargs, message", [
    ({"collisions": 1}, "collisions must be >= 2, got 1"),
    ({"collisions": -3}, "collisions must be >= 2, got -3"),
    ({"max_error": 0}, "max_error must be > 0, got 0"),
    ({"max_error": float("nan")}, "max_error must be > 0, got nan"),
])
def test_refusals_name_the_value(kwargs, message):
    with pytest.raises(ValueError) as e:
        BucketOptions(**kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize("name", ["hash", "qr"])
def test_the_passes_that_share_it_refuse_and_skip_alike(name):
    with pytest.raises(RewriteError) as e:
        parse_pass(f"{name}:collisions=1")
    assert str(e.value) == f"pass {name}: collisions must be >= 2, got 1"
    _, report = apply(small_model(rows=(200, 201)), [getattr(passes, name)()])
    assert [(t.status, t.reason) for t in report.tables][0] == ("skipped", "200 rows < min_rows=201")
    assert report.tables[1].status == "rewritten"
