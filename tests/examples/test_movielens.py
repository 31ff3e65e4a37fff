"""MovieLens-100k (RecBole's wheel, extracted by ``make install``) converted to a CTR task and a
DLRM trained on it.  Skips by name where the data are absent; ``make install`` provides them."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import movielens  # noqa: E402

SRC = ROOT / movielens.DEFAULT_SRC
needs_data = pytest.mark.skipif(not (SRC / "ml-100k.inter").exists(),
                                reason=f"MovieLens-100k absent at {SRC}: run `make install`")


@pytest.fixture(scope="module")
def converted():
    return movielens.convert(SRC)


@needs_data
def test_splits_are_time_ordered_labelled_and_within_the_tables(converted):
    splits, rows = converted
    assert sum(v[2].shape[0] for v in splits.values()) == 100_000
    n = {k: v[2].shape[0] for k, v in splits.items()}
    assert 0.78 < n["train"] / 100_000 < 0.81 and 0.09 < n["test"] / 100_000 < 0.11
    users = {k: set(v[1][:, 0]) for k, v in splits.items()}
    assert users["test"] <= users["train"]                    # split per user: every test user trained
    assert rows["user"] == 943 and rows["item"] == 1682 and rows["weekday"] == 7 and rows["hour"] == 24
    for x_int, x_cat, y in splits.values():
        assert x_cat.shape[1] == len(movielens.FEATURES) and x_int.shape[1] == len(movielens.DENSE)
        assert (x_int >= 0).all() and set(np.unique(y)) == {0, 1}
        assert (x_cat >= 0).all() and all(x_cat[:, j].max() < rows[f] for j, f in enumerate(movielens.FEATURES))
        assert 0.45 < y.mean() < 0.6                             # rating >= 4 is a click
    # counts of earlier ratings only grow along time: the test split comes after training
    prior = movielens.DENSE.index("user_prior")
    tr, te = splits["train"], splits["test"]
    u = movielens.FEATURES.index("user")
    last = {}
    for x_int, x_cat, _ in (tr, splits["valid"], te):
        for uid, p in zip(x_cat[:, u], x_int[:, prior]):
            assert p == last.get(uid, -1) + 1                     # each rating counts all before it
            last[uid] = p


@needs_data
def test_prior_clicks_count_only_earlier_clicks(converted):
    splits, _ = converted
    x_int, x_cat, y = (np.concatenate(a) for a in zip(*splits.values()))
    clicks, prior = movielens.DENSE.index("user_prior_clicks"), movielens.DENSE.index("user_prior")
    total: dict[int, int] = {}
    for k, uid in enumerate(x_cat[:, 0]):
        assert x_int[k, clicks] == total.get(uid, 0) <= x_int[k, prior]
        total[uid] = total.get(uid, 0) + int(y[k])


@needs_data
def test_the_script_trains_a_dlrm_that_beats_chance_on_the_test_split(tmp_path):
    import rewrite

    from rewrite import data

    assert movielens.main(["--src", str(SRC), "--out", str(tmp_path), "--epochs", "2", "--augment", "1"]) == 0
    summary = json.loads((tmp_path / "train.json").read_text())
    distill = data.open(tmp_path / "distill.npz")
    assert distill.labels is None and distill.n_samples == 2 * summary["samples"]["train"]
    assert summary["test_auc"] > 0.75 and len(summary["valid_auc_per_epoch"]) <= 2
    model = rewrite.load(tmp_path / "model.pt")
    assert [t.rows for t in model.embeddings.values()] == list(summary["features"].values())
    assert movielens.main(["--src", str(SRC), "--out", str(tmp_path)]) == 0       # reused, not retrained


def test_missing_source_and_wheel_are_one_line_errors(tmp_path, capsys):
    assert movielens.main(["--src", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "ml-100k.inter: missing; run `make install`" in capsys.readouterr().err
    assert movielens.main(["--extract", str(tmp_path), "--src", str(tmp_path / "x")]) == 2
    assert "no recbole-*.whl" in capsys.readouterr().err


def test_extract_takes_the_three_files_out_of_a_wheel(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "recbole-9.9-py3-none-any.whl", "w") as zf:
        for name in ("inter", "user", "item", "kg"):
            zf.writestr(movielens.WHEEL_FOLDER + f"ml-100k.{name}", f"{name}\n")
    out = movielens.extract(tmp_path, tmp_path / "ml")
    assert sorted(p.name for p in (tmp_path / "ml").iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    assert (tmp_path / "ml" / "ml-100k.user").read_text() == "user\n" and len(out) == 3


def test_augment_permutes_only_the_item_side_across_rows():
    x_cat = np.arange(40, dtype=np.int32).reshape(4, 10).repeat(1, 0)
    x_cat = np.concatenate([x_cat, np.full((4, 1), 7, np.int32)], axis=1)         # 11 features
    x_int = np.arange(28, dtype=np.int32).reshape(4, 7)
    xi, xc = movielens.augment(x_int, x_cat, copies=2, seed=1)
    assert xi.shape == (12, 7) and xc.shape == (12, 11)
    assert np.array_equal(xc[:4], x_cat) and np.array_equal(xi[:4], x_int)
    item = [movielens.FEATURES.index(f) for f in movielens.ITEM_SIDE[0]]
    user = [j for j in range(11) if j not in item]
    dense_item = [movielens.DENSE.index(f) for f in movielens.ITEM_SIDE[1]]
    for k in (1, 2):
        copy_c, copy_i = xc[4 * k:4 * k + 4], xi[4 * k:4 * k + 4]
        assert np.array_equal(copy_c[:, user], x_cat[:, user])                     # user side kept
        rows = [int(np.flatnonzero((x_cat[:, item] == r).all(1))[0]) for r in copy_c[:, item]]
        assert sorted(rows) == [0, 1, 2, 3]                                         # a permutation
        assert np.array_equal(copy_i[:, dense_item], x_int[rows][:, dense_item])   # moved together
