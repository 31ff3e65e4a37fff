"""TorchRec-preprocessed npy triplets, written as tsv_to_npys writes them, read memory-mapped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import rewrite
from rewrite import data
from rewrite.cli import main
from tests.rewrite.data_formats.criteo_ref import (N_CAT, expected_rows, log1p, parse_line, torchrec_checkpoint,
                                           tsv_lines, write_torchrec_npys)
from tests.rewrite.data_formats.test_criteo_tsv import read_all, reference_columns
from tests.tolerances import assert_close

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("npy")
    rows = torchrec_checkpoint(tmp / "m.pt")
    lines = tsv_lines(30, rows, seed=6)
    (tmp / "day_0.tsv").write_text("".join(lines))
    write_torchrec_npys(lines, tmp / "day_0")
    return tmp, rewrite.load(tmp / "m.pt"), rows, lines


@pytest.mark.parametrize("name", ["day_0", "day_0_", "day_0_dense.npy", "day_0_sparse.npy", "day_0_labels.npy"])
def test_triplet_matches_the_tsv_it_came_from(setup, name):
    tmp, model, rows, lines = setup
    ds = data.open(tmp / name, model=model)
    assert isinstance(ds.dense, np.memmap) and isinstance(ds.cat, np.memmap)
    assert ds.cat.dtype == np.int32 and ds.dense_stored == "log3"
    got = read_all(ds, batch_size=8)
    # the same rows through TorchRec's conventions: TSV with int32 wrap and log(x + 3)
    tsv = read_all(data.open(tmp / "day_0.tsv", model=model, hash_mode="torchrec"), batch_size=8)
    assert_close(got[0], tsv[0], "dense-transform", name)
    assert np.array_equal(got[1], tsv[1]) and np.array_equal(got[2], tsv[2])
    assert (got[1] == np.array(rows) - 1).any(axis=0).all()


def test_dlrm_transform_of_torchrec_dense(setup):
    tmp, model, rows, lines = setup
    dense, _, _ = read_all(data.open(tmp / "day_0", "log1p", model=model))
    want = reference_columns(lines, rows, "torchrec", log1p)[0]
    assert_close(dense, want, "dense-log3-as-log1p", "torchrec dense read as dlrm's")


def test_model_runs_on_npy_batches(setup):
    tmp, model, rows, lines = setup
    b = next(data.open(tmp / "day_0", model=model).batches(30))
    ref = torch.load(tmp / "m.pt")
    ids = np.array([expected_rows(parse_line(ln)[2], rows, "torchrec") for ln in lines])
    for f in range(N_CAT):  # one lookup per feature: the pooled embedding is the row itself
        w = ref[f"sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{f}.weight"]
        emb = model.embeddings[f"t_cat_{f}"](b.indices[f * 30:(f + 1) * 30], torch.arange(31))
        assert torch.equal(emb, w[torch.from_numpy(ids[:, f])])
    assert model(*b.inputs()).shape == (30,)


def test_broken_triplets(tmp_path):
    np.save(tmp_path / "d_dense.npy", np.zeros((4, 13), np.float32))
    np.save(tmp_path / "d_sparse.npy", np.zeros((4, 26), np.int32))
    with pytest.raises(rewrite.RewriteError, match=r"d_labels\.npy: missing; TorchRec data come as"):
        data.open(tmp_path / "d_dense.npy")
    np.save(tmp_path / "d_labels.npy", np.zeros((3, 1), np.int32))
    with pytest.raises(rewrite.RewriteError, match=r"labels have shape \(3, 1\), expected \(4, 1\)"):
        data.open(tmp_path / "d")
    np.save(tmp_path / "d_labels.npy", np.zeros((4, 1), np.int32))
    np.save(tmp_path / "d_sparse.npy", np.zeros((4, 26), np.float32))
    with pytest.raises(rewrite.RewriteError, match=r"sparse must hold integers, found float32"):
        data.open(tmp_path / "d")
    np.save(tmp_path / "d_sparse.npy", np.array([object()] * 4), allow_pickle=True)
    with pytest.raises(rewrite.RewriteError, match=r"d_sparse\.npy: not a readable \.npy array"):
        data.open(tmp_path / "d")
    np.save(tmp_path / "lone.npy", np.zeros(3))
    with pytest.raises(rewrite.RewriteError, match=r"lone\.npy: a lone \.npy"):
        data.open(tmp_path / "lone.npy")


def test_profile_cli_on_triplet(setup):
    tmp, model, rows, lines = setup
    res = CliRunner().invoke(main, ["profile", str(tmp / "m.pt"), "--data", str(tmp / "day_0"),
                                    "--json", "-o", str(tmp / "p.json")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["samples"] == 30
    prof = rewrite.AccessProfile.load(tmp / "p.json", model)
    sparse = np.load(tmp / "day_0_sparse.npy")
    for f in range(N_CAT):
        assert np.array_equal(prof.counts(f"t_cat_{f}"), np.bincount(sparse[:, f] % rows[f], minlength=rows[f]))
