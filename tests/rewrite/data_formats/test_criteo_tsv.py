"""Raw Criteo TSV: streamed, parsed against a plain-Python TorchRec-style parser."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import rewrite
from rewrite import data
from rewrite.cli import main
from rewrite.formats import dlrm
from rewrite.training import table_dlrm
from tests.rewrite.data_formats.criteo_ref import (N_CAT, expected_rows, log1p, log3, parse_line,
                                           torchrec_checkpoint, tsv_lines)
from tests.tolerances import assert_close

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_and_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "torchrec.pt"
    rows = torchrec_checkpoint(path)
    return rewrite.load(path), rows


def reference_columns(lines, rows, mode, transform, labeled=True):
    parsed = [parse_line(ln, labeled) for ln in lines]
    dense = np.array([[transform(x) for x in d] for _, d, _ in parsed], dtype=np.float32)
    ids = np.array([expected_rows(s, rows, mode) for _, _, s in parsed], dtype=np.int64)
    labels = np.array([lab for lab, _, _ in parsed], dtype=np.float32) if labeled else None
    return dense, ids, labels


def read_all(ds, batch_size=7):
    dense, ids, labels = [], [], []
    for b in ds.batches(batch_size):
        n = b.size
        assert torch.equal(b.offsets, torch.arange(n * N_CAT + 1))  # one id per feature per row
        dense.append(b.dense.numpy())
        ids.append(b.indices.numpy().reshape(N_CAT, n).T)  # feature-major -> [n, F]
        labels.append(None if b.labels is None else b.labels.numpy())
    return (np.concatenate(dense), np.concatenate(ids),
            None if labels[0] is None else np.concatenate(labels))


@pytest.mark.parametrize("mode", ["mod", "torchrec"])
def test_batches_match_reference(tmp_path, model_and_rows, mode):
    model, rows = model_and_rows
    lines = tsv_lines(40, rows, seed=1)
    (tmp_path / "day_0").write_text("".join(lines))
    ds = data.open(tmp_path / "day_0", model=model, hash_mode=mode)
    dense, ids, labels = read_all(ds)
    want_dense, want_ids, want_labels = reference_columns(lines, rows, mode, log3)  # TorchRec model
    assert_close(dense, want_dense, "dense-transform", mode)
    assert np.array_equal(ids, want_ids) and np.array_equal(labels, want_labels)
    assert (ids == np.array(rows) - 1).any(axis=0).all()  # every table's largest row is used
    if mode == "torchrec":
        mod_ids = reference_columns(lines, rows, "mod", log3)[1]
        assert not np.array_equal(mod_ids, ids)  # the int32 wrap changes rows of ids >= 2**31


def test_dlrm_model_defaults_to_log1p_and_gzip_unlabeled(tmp_path):
    rows = [5 + i for i in range(N_CAT)]
    dlrm.write(table_dlrm(rows, dim=4, bottom=(4,), top=(4, 1)), tmp_path / "m.pt")
    model = rewrite.load(tmp_path / "m.pt")
    lines = tsv_lines(9, rows, seed=2, labeled=False)
    with gzip.open(tmp_path / "test.txt.gz", "wt") as f:
        f.write("".join(lines))
    dense, ids, labels = read_all(data.open(tmp_path / "test.txt.gz", model=model), batch_size=4)
    want_dense, want_ids, _ = reference_columns(lines, rows, "mod", log1p, labeled=False)
    assert_close(dense, want_dense, "dense-transform", "gzip, unlabeled")
    assert np.array_equal(ids, want_ids) and labels is None


def test_crlf_and_no_final_newline(tmp_path, model_and_rows):
    model, rows = model_and_rows
    lines = tsv_lines(5, rows, seed=9)
    (tmp_path / "d.tsv").write_bytes("".join(ln.replace("\n", "\r\n") for ln in lines).encode()[:-2])
    ids = read_all(data.open(tmp_path / "d.tsv", model=model), batch_size=5)[1]
    assert np.array_equal(ids, reference_columns(lines, rows, "mod", log3)[1])


BAD = [("1\t2" + "\t3" * 37 + "\n", "expected 40 tab-separated fields, found 39"),
       ("7" + "\t1" * 13 + "\tab" * 26 + "\n", "label must be 0 or 1, found '7'"),
       ("0\t1\t2.5" + "\t1" * 11 + "\tab" * 26 + "\n", "integer column 2 is '2.5'"),
       ("0" + "\t1" * 13 + "\tab" * 25 + "\t12345xyz\n", "categorical column 26 is '12345xyz', not a hexadecimal id"),
       ("0" + "\t1" * 13 + "\t" + "f" * 17 + "\tab" * 25 + "\n", "categorical column 1 is 'fffffffffffffffff'"),
       ("\n", "expected 40 tab-separated fields, found 1")]


@pytest.mark.parametrize("bad, reason", BAD)
def test_bad_row_is_an_error_with_its_line_or_skipped(tmp_path, model_and_rows, bad, reason):
    model, rows = model_and_rows
    lines = tsv_lines(6, rows, seed=3)
    lines.insert(4, bad)
    (tmp_path / "d.tsv").write_text("".join(lines))
    with pytest.raises(rewrite.RewriteError, match=rf"d\.tsv:5: {reason}"):
        list(data.open(tmp_path / "d.tsv", model=model).batches(4))
    ds = data.open(tmp_path / "d.tsv", model=model, skip_bad_rows=True)
    dense, ids, _ = read_all(ds, batch_size=4)
    del lines[4]
    assert ds.skipped_rows == 1 and np.array_equal(ids, reference_columns(lines, rows, "mod", log3)[1])


def test_not_criteo_and_missing_sizes(tmp_path, model_and_rows):
    (tmp_path / "x.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(rewrite.RewriteError, match=r"x\.csv:1: not Criteo TSV .* found 1"):
        data.open(tmp_path / "x.csv")
    (tmp_path / "d.tsv").write_text("".join(tsv_lines(3, [10] * N_CAT)))
    with pytest.raises(rewrite.RewriteError, match=r"hash mode 'mod' needs the table sizes"):
        data.open(tmp_path / "d.tsv", hash_mode="mod")
    with pytest.raises(rewrite.RewriteError, match=r"a streamed TSV is read in order"):
        next(data.open(tmp_path / "d.tsv").batches(2, shuffle_seed=0))


def test_profile_cli_on_tsv(tmp_path, model_and_rows):
    model, rows = model_and_rows
    torchrec_checkpoint(tmp_path / "m.pt")
    lines = tsv_lines(50, rows, seed=4)
    (tmp_path / "day").write_text("".join(lines[:20] + ["garbage\n"] + lines[20:]))
    args = ["profile", str(tmp_path / "m.pt"), "--data", str(tmp_path / "day"), "--json",
            "--hash-mode", "torchrec", "-o", str(tmp_path / "p.json")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "day:21: expected 40 tab-separated fields, found 1" in res.output
    res = CliRunner().invoke(main, args + ["--skip-bad-rows"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["samples"] == 50 and out["skipped_bad_rows"] == 1
    prof = rewrite.AccessProfile.load(tmp_path / "p.json", model)
    ids = reference_columns(lines, rows, "torchrec", log3)[1]
    for f in range(N_CAT):
        assert np.array_equal(prof.counts(f"t_cat_{f}"), np.bincount(ids[:, f], minlength=rows[f]))
