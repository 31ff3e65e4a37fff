"""Checkpoints are data, not code: the loader never runs pickled code, and every unreadable file
(truncated, text, empty, a directory) gets one line naming the file and what is wrong."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
import torch

import rewrite
from rewrite.core.errors import RewriteError
from rewrite.formats.safe_pickle import load_pickled
from tests.reference_dlrm import DLRM_Net, save_like_dlrm


class _Payload:
    """Unpickling this runs ``os.system`` (it would create ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(payload) -> dict:
    net = DLRM_Net(4, [5, 9], [3, 4], [4 + 3, 1])
    return {"state_dict": net.state_dict(), "test_auc": np.float64(0.7), "extra": payload}


def expect_error(path, *fragments) -> str:
    with pytest.raises(RewriteError) as e:
        rewrite.load(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for fragment in (str(path), *fragments):
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def test_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    """The control: the same file loaded with weights_only=False does run the payload."""
    marker = tmp_path / "ran"
    torch.save(_checkpoint(_Payload(marker)), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("how", ["zip", "legacy", "plain-pickle-2", "plain-pickle-4"])
def test_code_in_pickle_is_refused_and_not_run(how, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    blob = _checkpoint(_Payload(marker))
    if how == "zip":
        torch.save(blob, path)
    elif how == "legacy":
        torch.save(blob, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump({"extra": _Payload(marker)}, f, protocol=int(how[-1]))
    with warnings.catch_warnings(record=True) as caught:
        msg = expect_error(path, "not a loadable checkpoint")
    assert not caught, "only the one-line error should reach the user"
    assert not marker.exists(), "the pickled code ran"
    if how != "plain-pickle-4":
        assert "names code to run" in msg and "system" in msg and "refusing to unpickle" in msg
    else:
        assert "safe (weights-only) loader refuses" in msg


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint(legacy, tmp_path):
    net = DLRM_Net(8, [40, 300, 2000], [13, 8], [14, 1])
    blob = {"state_dict": net.state_dict(), "test_auc": np.float64(0.7)}
    torch.save(blob, tmp_path / "m.pt", _use_new_zipfile_serialization=not legacy)
    raw = (tmp_path / "m.pt").read_bytes()
    for frac in np.linspace(0.01, 0.999, 12):
        (tmp_path / "cut.pt").write_bytes(raw[: int(len(raw) * frac)])
        expect_error(tmp_path / "cut.pt", "truncated or corrupted")
    (tmp_path / "empty.pt").write_bytes(b"")
    expect_error(tmp_path / "empty.pt", "truncated or corrupted")


def test_text_and_random_bytes(tmp_path):
    (tmp_path / "notes.txt").write_text("emb_l.0.weight: not really a checkpoint\n")
    expect_error(tmp_path / "notes.txt", "not a torch.save file")
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    expect_error(tmp_path / "noise.bin", "not a loadable checkpoint")


def test_directory_and_missing(tmp_path):
    expect_error(tmp_path, "is a directory")
    with pytest.raises(RewriteError, match="no such file"):
        load_pickled(tmp_path / "absent.pt")
    with pytest.raises(RewriteError, match="is a directory"):
        load_pickled(tmp_path)


def test_numpy_and_optimizer_state_allowed(tmp_path):
    """What dlrm pickles besides tensors loads: numpy scalars of several dtypes, optimizer state."""
    net = DLRM_Net(4, [5, 9], [3, 4], [7, 1])
    save_like_dlrm(net, tmp_path / "m.pt")
    obj = load_pickled(tmp_path / "m.pt")
    assert obj["test_auc"] == np.float64(0.7712) and isinstance(obj["test_auc"], np.float64)
    assert isinstance(obj["train_loss"], np.float32) and isinstance(obj["iter"], np.int64)
    assert obj["opt_state_dict"]["param_groups"][0]["lr"] == 0.1
