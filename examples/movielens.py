"""MovieLens-100k as a CTR task: convert RecBole's atomic files to dlrm .npz, train a table DLRM.

    python examples/movielens.py --extract .cache/wheels --src .cache/data/ml-100k   # make install
    python examples/movielens.py --src .cache/data/ml-100k --out ml100k/

Source: ``recbole/dataset_example/ml-100k/`` of RecBole's PyPI wheel (``make install`` fetches
the wheel with ``pip download --no-deps`` and extracts this folder to ``.cache/data/ml-100k``;
nothing is downloaded here).  The data are GroupLens' MovieLens-100k (research use under the
GroupLens terms, see README "Real data"): 100,000 ratings of 1,682 movies by 943 users.

Task: one sample per rating, **click = rating >= 4** (55% positives), in time order; each user's
ratings split in time order: the first 80% train, the next 10% validate (model selection), the
last 10% test (``split_by_user``: every test user was seen in training, nothing of a user's
future is trained on).

Categorical features (one id per sample, vocabularies from the side files, so no id is unseen):
user id, item id, age bucket (dlrm-style decades), gender, occupation, zip prefix (3 digits),
first and second genre (0: none), release decade, weekday and hour of the rating.
Dense features (count-like integers; the model sees log(1 + x)): age, years from release to the
rating, the user's and the item's number of earlier ratings and earlier clicks (strictly before
this rating's timestamp order: no label leak), the number of genres.

Writes out/train.npz, out/valid.npz, out/test.npz (X_int, X_cat, y), out/model.pt (dlrm's
``--save-model`` format) and out/train.json (vocabulary sizes, epochs, AUCs).  ``--augment K``
also writes out/distill.npz, unlabelled data for recovery (``rewrite apply --recover``): the
training rows plus K copies whose item side (item, genres, decade and the item's dense
features) is permuted across rows, i.e. unseen user x item pairs the teacher labels with its
logits (``augment``).  Idempotent: existing outputs are reused unless --force.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

FEATURES = ("user", "item", "age_bucket", "gender", "occupation", "zip3", "genre1", "genre2",
            "decade", "weekday", "hour")
DENSE = ("age", "years_since_release", "user_prior", "item_prior", "user_prior_clicks",
         "item_prior_clicks", "n_genres")
AGE_EDGES = (18, 25, 35, 45, 50, 56)          # MovieLens-1M's age groups
SPLIT = (0.8, 0.1, 0.1)                        # train / valid / test, in time order
DEFAULT_SRC = Path(".cache/data/ml-100k")


class SourceError(ValueError):
    """The source folder is missing or malformed (one line, no traceback)."""


WHEEL_FOLDER = "recbole/dataset_example/ml-100k/"


def extract(wheels: Path, dest: Path) -> list[Path]:
    """Copy ``ml-100k.{inter,user,item}`` out of the newest RecBole wheel in ``wheels`` into ``dest``."""
    import zipfile

    from rewrite.core.atomic import atomic_path

    found = sorted(wheels.glob("recbole-*.whl"))
    if not found:
        raise SourceError(f"{wheels}: no recbole-*.whl (make install runs `pip download --no-deps recbole`)")
    out = []
    with zipfile.ZipFile(found[-1]) as zf:
        for name in ("ml-100k.inter", "ml-100k.user", "ml-100k.item"):
            try:
                blob = zf.read(WHEEL_FOLDER + name)
            except KeyError:
                raise SourceError(f"{found[-1]}: no {WHEEL_FOLDER + name}") from None
            dest.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest / name) as tmp:
                Path(tmp).write_bytes(blob)
            out.append(dest / name)
    return out


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    """A RecBole atomic file: a ``name:type`` header, tab-separated rows."""
    if not path.exists():
        raise SourceError(f"{path}: missing; run `make install` (it extracts MovieLens-100k from "
                          f"RecBole's wheel) or give --src")
    lines = path.read_text(encoding="latin-1").splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    rows = [ln.split("\t") for ln in lines[1:] if ln]
    if any(len(r) != len(header) for r in rows):
        raise SourceError(f"{path}: rows do not all have the header's {len(header)} columns")
    return header, rows


def _vocab(values) -> dict[str, int]:
    return {v: i for i, v in enumerate(sorted(set(values)))}


def convert(src: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], dict[str, int]]:
    """{split: (X_int, X_cat, y)} in time order, and the rows of each feature's table."""
    _, inter = _read(src / "ml-100k.inter")
    _, users = _read(src / "ml-100k.user")
    _, items = _read(src / "ml-100k.item")
    user = {u[0]: u for u in users}                     # id, age, gender, occupation, zip
    item = {i[0]: i for i in items}                     # id, title, year, genres
    inter = sorted(inter, key=lambda r: (float(r[3]), r[0], r[1]))     # time, then ids: stable
    voc = {"user": _vocab(user), "item": _vocab(item),
           "gender": _vocab(u[2] for u in users), "occupation": _vocab(u[3] for u in users),
           "zip3": _vocab(u[4][:3] for u in users)}
    genres = sorted({g for i in items for g in i[3].split()})
    voc["genre"] = {g: k + 1 for k, g in enumerate(genres)}            # 0: no genre
    years = [int(i[2]) for i in items if i[2].isdigit()]
    decade0 = min(years) // 10
    rows = {"user": len(voc["user"]), "item": len(voc["item"]), "age_bucket": len(AGE_EDGES) + 1,
            "gender": len(voc["gender"]), "occupation": len(voc["occupation"]), "zip3": len(voc["zip3"]),
            "genre1": len(genres) + 1, "genre2": len(genres) + 1,
            "decade": max(years) // 10 - decade0 + 2, "weekday": 7, "hour": 24}   # decade 0: unknown
    n = len(inter)
    x_cat = np.zeros((n, len(FEATURES)), np.int32)
    x_int = np.zeros((n, len(DENSE)), np.int32)
    y = np.zeros(n, np.int32)
    seen: dict[tuple[str, str], list[int]] = {}
    for k, (u, i, rating, ts) in enumerate(inter):
        if u not in user or i not in item:
            raise SourceError(f"{src / 'ml-100k.inter'}: rating {k} names user {u} / item {i} "
                              f"absent from the side files")
        _, age, gender, occ, zipc = user[u]
        g = item[i][3].split()
        when = dt.datetime.fromtimestamp(int(float(ts)), dt.timezone.utc)
        year = int(item[i][2]) if item[i][2].isdigit() else None
        x_cat[k] = (voc["user"][u], voc["item"][i], int(np.searchsorted(AGE_EDGES, int(age), "right")),
                    voc["gender"][gender], voc["occupation"][occ], voc["zip3"][zipc[:3]],
                    voc["genre"][g[0]] if g else 0, voc["genre"][g[1]] if len(g) > 1 else 0,
                    0 if year is None else year // 10 - decade0 + 1, when.weekday(), when.hour)
        cu, ci = seen.setdefault(("u", u), [0, 0]), seen.setdefault(("i", i), [0, 0])
        x_int[k] = (int(age), 0 if year is None else max(0, when.year - year), cu[0], ci[0], cu[1], ci[1], len(g))
        y[k] = float(rating) >= 4
        cu[0] += 1
        ci[0] += 1
        cu[1] += int(y[k])
        ci[1] += int(y[k])
    part = split_by_user(x_cat[:, 0])
    return {name: (x_int[part == k], x_cat[part == k], y[part == k])
            for k, name in enumerate(("train", "valid", "test"))}, rows


def split_by_user(users: np.ndarray) -> np.ndarray:
    """0 / 1 / 2 (train / valid / test) per sample of a time-ordered log: each user's own
    ratings in time order, the first ``SPLIT[0]`` share train, the next ``SPLIT[1]`` validate,
    the rest test (RecBole's ``order: TO, split: RS, group_by: user``).  A global cut in time
    would leave 86% of the test samples to users never seen in training (MovieLens-100k's users
    arrive over the months), whose rows are still at their random start."""
    part = np.zeros(len(users), np.int8)
    for u in np.unique(users):
        idx = np.flatnonzero(users == u)                 # in time order
        a, b = int(len(idx) * SPLIT[0]), int(len(idx) * (SPLIT[0] + SPLIT[1]))
        part[idx[a:b]], part[idx[b:]] = 1, 2
    return part


ITEM_SIDE = (("item", "genre1", "genre2", "decade"),
             ("years_since_release", "item_prior", "item_prior_clicks", "n_genres"))


def augment(x_int: np.ndarray, x_cat: np.ndarray, copies: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(X_int, X_cat) of the rows plus ``copies`` copies with the item side permuted across rows."""
    cat = [FEATURES.index(f) for f in ITEM_SIDE[0]]
    dense = [DENSE.index(f) for f in ITEM_SIDE[1]]
    rng = np.random.default_rng(seed)
    xi, xc = [x_int], [x_cat]
    for _ in range(copies):
        p = rng.permutation(len(x_cat))
        a, b = x_int.copy(), x_cat.copy()
        a[:, dense], b[:, cat] = x_int[p][:, dense], x_cat[p][:, cat]
        xi.append(a)
        xc.append(b)
    return np.concatenate(xi), np.concatenate(xc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder holding ml-100k.{inter,user,item}")
    ap.add_argument("--out", type=Path, default=Path("ml100k"))
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10, help="at most; the best validation AUC is kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--augment", type=int, default=0, metavar="K",
                    help="also write distill.npz: train rows + K item-permuted copies, unlabelled")
    ap.add_argument("--extract", type=Path, metavar="WHEELS",
                    help="only extract the data from the RecBole wheel in this folder into --src")
    args = ap.parse_args(argv)
    if args.extract is not None:
        try:
            print("\n".join(map(str, extract(args.extract, args.src))))
        except SourceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    import torch

    from rewrite import data
    from rewrite.core.atomic import write_text
    from rewrite.core.synthetic import write_npz
    from rewrite.formats import dlrm
    from rewrite.training import evaluate, fit, table_dlrm

    model_path = args.out / "model.pt"
    if model_path.exists() and not args.force:
        print(f"{model_path} exists (use --force to rebuild)", file=sys.stderr)
        return 0
    try:
        splits, rows = convert(args.src)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, arrays in splits.items():
        write_npz(args.out / f"{name}.npz", *arrays)
    if args.augment > 0:
        from rewrite.core.atomic import atomic_path

        xi, xc = augment(*splits["train"][:2], args.augment, args.seed)
        with atomic_path(args.out / "distill.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, X_int=xi, X_cat=xc)               # no y: recovery distils logits only
    torch.set_num_threads(1)
    tr, va, te = (data.open(args.out / f"{s}.npz") for s in ("train", "valid", "test"))
    model = table_dlrm([rows[f] for f in FEATURES], n_dense=len(DENSE), dim=args.dim, seed=args.seed)
    model, history = fit(model, tr, va, max_epochs=args.epochs, lr=2e-3, seed=args.seed)
    test = evaluate(model, te)
    meta = {"nepochs": len(history), "nbatches": -(-tr.n_samples // 512), "test_auc": test.auc,
            "epoch": int(np.argmax(history)), "iter": -(-tr.n_samples // 512)}
    dlrm.write(model, model_path, meta)
    summary = {"source": str(args.src), "features": dict(zip(FEATURES, [rows[f] for f in FEATURES])),
               "dense": list(DENSE), "samples": {k: int(v[2].shape[0]) for k, v in splits.items()},
               "positives": {k: float(v[2].mean()) for k, v in splits.items()},
               "valid_auc_per_epoch": history, "test_auc": test.auc, "test_logloss": test.logloss,
               "embedding_bytes": model.embedding_bytes()}
    write_text(args.out / "train.json", json.dumps(summary, indent=1))
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
