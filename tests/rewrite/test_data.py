"""dlrm-processed .npz reading: memory-mapped uncompressed members and read compressed ones give
the same values, dlrm's dense transform, batching, sampling, and every malformed-file error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewrite import data
from rewrite.core.errors import RewriteError
from rewrite.core.synthetic import write_npz
from tests.tolerances import assert_close


def arrays(n=50, f=3, seed=0):
    rng = np.random.default_rng(seed)
    x_int = rng.integers(-1, 1000, (n, 13)).astype(np.int32)
    x_cat = rng.integers(0, 100, (n, f)).astype(np.int32)
    y = rng.integers(0, 2, n).astype(np.int32)
    return x_int, x_cat, y


def test_uncompressed_members_are_memory_mapped(tmp_path):
    x_int, x_cat, y = arrays()
    write_npz(tmp_path / "d.npz", x_int, x_cat, y)
    ds = data.open(tmp_path / "d.npz")
    assert isinstance(ds.cat, np.memmap) and isinstance(ds.dense, np.memmap)
    assert np.array_equal(ds.dense, x_int) and np.array_equal(ds.cat, x_cat) and np.array_equal(ds.labels, y)
    assert (ds.n_samples, ds.n_dense, ds.n_features) == (50, 13, 3)


def test_compressed_and_fortran_members_read_the_same(tmp_path):
    x_int, x_cat, y = arrays()
    np.savez_compressed(tmp_path / "c.npz", X_int=x_int, X_cat=x_cat, y=y)
    np.savez(tmp_path / "f.npz", X_int=np.asfortranarray(x_int), X_cat=np.asfortranarray(x_cat), y=y)
    compressed, fortran = data.open(tmp_path / "c.npz"), data.open(tmp_path / "f.npz")
    assert not isinstance(compressed.cat, np.memmap) and isinstance(fortran.cat, np.memmap)
    for ds in (compressed, fortran):
        assert np.array_equal(ds.dense, x_int) and np.array_equal(ds.cat, x_cat)
        b = ds.batch(slice(5, 9))
        assert b.indices.tolist() == x_cat[5:9].T.reshape(-1).tolist()


def test_dense_transform(tmp_path):
    x_int, x_cat, y = arrays()
    x_int[0, :3] = [-1, 0, 7]
    write_npz(tmp_path / "d.npz", x_int, x_cat, y)
    b = data.open(tmp_path / "d.npz").batch(slice(0, 10))
    expected = np.log(np.maximum(x_int[:10], 0) + 1).astype(np.float32)     # dlrm's transform
    assert b.dense.dtype == torch.float32
    assert_close(b.dense, expected, "dense-transform", "log(x + 1)")
    assert b.dense[0, :3].tolist() == pytest.approx([0.0, 0.0, np.log(8.0)])
    raw = data.open(tmp_path / "d.npz", dense_transform="none").batch(slice(0, 10))
    assert np.array_equal(raw.dense.numpy(), x_int[:10].astype(np.float32))
    with pytest.raises(RewriteError, match="unknown dense transform 'sqrt' \\(choose from log1p, log3, none\\)"):
        data.open(tmp_path / "d.npz", dense_transform="sqrt")


def test_batches_cover_rows_once(tmp_path):
    x_int, x_cat, y = arrays(n=103)
    write_npz(tmp_path / "d.npz", x_int, x_cat, y)
    ds = data.open(tmp_path / "d.npz")
    sizes = [b.size for b in ds.batches(25)]
    assert sizes == [25, 25, 25, 25, 3]
    got = np.concatenate([b.labels.numpy() for b in ds.batches(25, limit=60, start=10)])
    assert np.array_equal(got, y[10:70].astype(np.float32))
    shuffled = [b.dense for b in ds.batches(16, shuffle_seed=4)]
    again = [b.dense for b in ds.batches(16, shuffle_seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again))
    rows = torch.cat(shuffled)
    assert rows.shape[0] == 103 and not torch.equal(rows, ds.batch(slice(None)).dense)
    assert torch.equal(rows.sort(0).values, ds.batch(slice(None)).dense.sort(0).values)


def test_sample_rows(tmp_path):
    x_int, x_cat, y = arrays(n=20000, f=1)
    write_npz(tmp_path / "d.npz", x_int, x_cat, y)
    ds = data.open(tmp_path / "d.npz")
    assert np.array_equal(ds.sample_rows(1.0), np.arange(20000))
    s = ds.sample_rows(0.05, seed=1)
    assert np.array_equal(s, ds.sample_rows(0.05, seed=1)) and not np.array_equal(s, ds.sample_rows(0.05, seed=2))
    assert abs(len(s) - 1000) < 4 * np.sqrt(1000)        # Bernoulli(0.05): 1000 ± 4 sd
    assert np.all(np.diff(s) > 0)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(RewriteError, match=f"sample rate must be in \\(0, 1\\], got {bad}"):
            ds.sample_rows(bad)


def expect_error(path, *fragments):
    with pytest.raises(RewriteError) as e:
        data.open(path)
    msg = str(e.value)
    assert "\n" not in msg
    for f in (str(path), *fragments):
        assert f in msg, f"{f!r} not in {msg!r}"


def test_wrong_or_missing_columns(tmp_path):
    x_int, x_cat, y = arrays()
    np.savez(tmp_path / "no_cat.npz", X_int=x_int, y=y)
    expect_error(tmp_path / "no_cat.npz", "missing array(s) X_cat", "found X_int, y")
    np.savez(tmp_path / "other.npz", a=x_int)
    expect_error(tmp_path / "other.npz", "missing array(s) X_int, X_cat")
    np.savez(tmp_path / "float_ids.npz", X_int=x_int, X_cat=x_cat.astype(np.float32), y=y)
    expect_error(tmp_path / "float_ids.npz", "X_cat must hold integer ids, found float32")
    np.savez(tmp_path / "rows.npz", X_int=x_int[:40], X_cat=x_cat, y=y)
    expect_error(tmp_path / "rows.npz", "X_int (40, 13) and X_cat (50, 3) must be 2-D with the same number of rows")
    np.savez(tmp_path / "flat.npz", X_int=x_int, X_cat=x_cat[:, 0], y=y)
    expect_error(tmp_path / "flat.npz", "must be 2-D")
    np.savez(tmp_path / "y.npz", X_int=x_int, X_cat=x_cat, y=y[:10])
    expect_error(tmp_path / "y.npz", "y has shape (10,), expected (50,)")
    np.savez(tmp_path / "object.npz", X_int=x_int, X_cat=np.array([[1, "a"]] * 50, dtype=object), y=y)
    expect_error(tmp_path / "object.npz", "unreadable array in the archive")


def test_not_an_npz(tmp_path):
    (tmp_path / "day.npz").write_text("X_int,X_cat,y\n1,2,3\n")
    expect_error(tmp_path / "day.npz", "not an .npz archive")
    expect_error(tmp_path / "absent.npz", "no such data file")


def test_unlabelled_data_and_column_mismatch(tmp_path):
    x_int, x_cat, _ = arrays()
    np.savez(tmp_path / "d.npz", X_int=x_int, X_cat=x_cat)
    ds = data.open(tmp_path / "d.npz")
    b = ds.batch(slice(0, 4))
    assert ds.labels is None and b.labels is None
    with pytest.raises(RewriteError, match="these data have no labels"):
        data.labels_tensor(b)
    with pytest.raises(RewriteError, match="data has 13 dense and 3 categorical columns, the model takes 13 and 26"):
        data.check_matches(ds, 13, 26)
