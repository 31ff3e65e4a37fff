"""fit_sharing: a fitted table crosses ranks as bytes and comes back bit-identical; errors travel."""

from __future__ import annotations

import pytest
import torch

from rewrite.core.errors import RewriteError, VerificationError
from rewrite.core.pass_contract import parse_pass
from rewrite.distributed import SINGLE, RankError
from rewrite.fit_sharing import decode, encode, share
from rewrite.pass_manager import TableReport, apply
from tests.pass_helpers import batches, small_model

torch.set_num_threads(1)


def fitted_tables():
    """(report, representation) of tt, robe and rowwise-int4 fits on a small model."""
    model = small_model(rows=(3, 40, 257, 1000))
    passes = [parse_pass("tt:rank=4:tables=t3"), parse_pass("robe:tables=t1:compression=2"),
              parse_pass("quantize:bits=4:tables=t2")]
    new, report = apply(model, passes)
    return new, [(r, new.embeddings[r.table]) for r in report.tables if r.status == "rewritten"]


def test_decoded_tables_are_the_fitted_ones_bit_for_bit():
    model, fitted = fitted_tables()
    assert {rep.kind for _, rep in fitted} == {"tt", "robe", "rowwise"}
    err, back = decode(encode(fitted, None), TableReport)
    assert err is None and len(back) == len(fitted)
    probe = batches(model, n=1)[0]
    for (r0, rep0), (r1, rep1) in zip(fitted, back):
        assert vars(r0) == vars(r1)
        assert rep1.spec() == rep0.spec()
        s0, s1 = rep0.state_dict(), rep1.state_dict()
        assert s0.keys() == s1.keys()
        for k in s0:
            assert s0[k].dtype == s1[k].dtype and torch.equal(s0[k], s1[k]), k
        feats = [f for f, t in enumerate(model.feature_tables) if t == r0.table]
        lo, hi = int(probe.offsets[feats[0] * probe.size]), int(probe.offsets[(feats[0] + 1) * probe.size])
        idx, off = probe.indices[lo:hi], probe.offsets[feats[0] * probe.size:(feats[0] + 1) * probe.size + 1] - lo
        assert torch.equal(rep0(idx, off), rep1(idx, off))


def test_skipped_tables_travel_without_a_representation():
    report = TableReport("t0", "quantize", "skipped", reason="3 rows < min_rows=10", notes={"k": (1, 2)})
    err, back = decode(encode([(report, None)], None), TableReport)
    assert err is None and back[0][1] is None and back[0][0].reason == report.reason
    assert back[0][0].notes == {"k": [1, 2]}


def test_an_error_keeps_its_one_line_and_exit_code():
    err, back = decode(encode([], VerificationError("t3 exceeds\nits tolerance")), TableReport)
    assert back == [] and err == {"message": "t3 exceeds its tolerance", "exit_code": 1}
    err, _ = decode(encode([], KeyError("t9")), TableReport)
    assert err == {"message": "KeyError: 't9'", "exit_code": 2}


def test_share_on_one_process_raises_the_error_as_rank_0s():
    with pytest.raises(RankError, match=r"^rank 0: bad table$") as e:
        share(SINGLE, [], RewriteError("bad table"), TableReport)
    assert e.value.exit_code == 2
    _, fitted = fitted_tables()
    got = share(SINGLE, fitted, None, TableReport)
    assert {t: rep for t, (_, rep) in got.items()} == {r.table: rep for r, rep in fitted}
