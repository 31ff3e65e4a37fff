"""Make the demo: synthetic Criteo-shaped days, a table DLRM trained on day 0, saved as dlrm does.

    python examples/train_demo.py --out demo/
    python examples/train_demo.py --out small/ --max-rows 2000     # tables of 3..2,000 rows

writes demo/day_0.npz (training), demo/day_1.npz (held out), demo/model.pt (dlrm
``--save-model`` format, with test_auc / test_acc metadata) and demo/train.json.
Idempotent: existing outputs are reused unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rewrite import data
from rewrite.core.atomic import write_text
from rewrite.formats import dlrm
from rewrite.core.synthetic import Synthetic, SyntheticConfig, demo_rows, write_npz
from rewrite.training import evaluate, table_dlrm, train

TRAIN_ROWS, EVAL_ROWS = 300_000, 100_000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo"))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rows", type=int, default=20_000,
                    help="cap on a table's rows (Kaggle's counts capped; 2000: a small model)")
    args = ap.parse_args(argv)
    out = args.out
    model_path = out / "model.pt"
    if model_path.exists() and not args.force:
        print(f"{model_path} exists (use --force to retrain)", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    gen = Synthetic(SyntheticConfig(rows=demo_rows(args.max_rows), seed=args.seed))
    for day, n in ((0, TRAIN_ROWS), (1, EVAL_ROWS)):
        print(f"generating day {day}: {n:,} samples", file=sys.stderr)
        write_npz(out / f"day_{day}.npz", *gen.sample(n, seed=day))
    train_data, eval_data = data.open(out / "day_0.npz"), data.open(out / "day_1.npz")
    model = table_dlrm(list(gen.cfg.rows), seed=args.seed)
    t0 = time.perf_counter()
    train(model, train_data, epochs=1, lr=5e-3, seed=args.seed)
    seconds = time.perf_counter() - t0
    ev = evaluate(model, eval_data)
    x_int, x_cat, y = eval_data.dense, eval_data.cat, eval_data.labels
    from rewrite.core.metrics import auc

    teacher = auc(y, gen.teacher_probability(x_int, x_cat))
    acc = float(((model(*eval_data.batch(slice(None)).inputs()) > 0).float().numpy() == y).mean())
    dlrm.write(model, model_path, {"nepochs": 1, "nbatches": -(-TRAIN_ROWS // 512), "test_auc": ev.auc,
                                   "test_acc": acc, "epoch": 0, "iter": -(-TRAIN_ROWS // 512)})
    report = {"train_samples": TRAIN_ROWS, "eval_samples": EVAL_ROWS, "train_seconds": seconds,
              "eval_auc": ev.auc, "eval_logloss": ev.logloss, "eval_accuracy": acc,
              "teacher_auc": teacher, "positives": float(y.mean())}
    write_text(out / "train.json", json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
