"""Batches of every size, as a server's merged batches come: each path of a bundle through
``rewrite.runtime`` on a stream of batches of random sizes, against the same number of
batches all of one size (their mean) in the same run.

    PYTHONPATH=. python benchmarks/varying_batches.py BUNDLE [--batches 1200] [--max-rows 1024] \
        [-o benchmarks/results/varying_batches.json]

Per path: ms per batch over the stream's first quarter and its last half (steady state), and
the same for the fixed-size stream; ``penalty`` = steady varying / steady fixed.  An engine
with per-size state (oneDNN primitives, compiled shapes) pays a cost per new size; without it
the penalty is ~1.  One intra-op thread; every path in this one process, one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewrite.core.atomic import write_text  # noqa: E402
from rewrite.core.isa import active_tier, cpu_model  # noqa: E402
from rewrite.core.timing import serving_batches  # noqa: E402
from rewrite.runtime import load  # noqa: E402


def stream_ms(pred, path: str, batches: list) -> np.ndarray:
    out = []
    for x in batches:
        t0 = time.perf_counter()
        pred.predict(*x, path=path)
        out.append(time.perf_counter() - t0)
    return 1e3 * np.array(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batches", type=int, default=1200)
    ap.add_argument("--min-rows", type=int, default=9, help="above SMALL_MAX_BATCH: the batched forms")
    ap.add_argument("--max-rows", type=int, default=1024)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args(argv)
    pred = load(args.bundle, threads=1)
    b = pred.bundle
    rng = np.random.default_rng(0)
    sizes = rng.integers(args.min_rows, args.max_rows + 1, args.batches)
    pool = {int(s): serving_batches(b.table_rows(), b.n_dense, int(s), 1, seed=int(s))[0] for s in set(sizes)}
    mean = int(round(sizes.mean()))
    fixed = serving_batches(b.table_rows(), b.n_dense, mean, 8, seed=1)
    varying = [pool[int(s)] for s in sizes]
    q, h = args.batches // 4, args.batches // 2
    result = {"benchmark": "varying_batches", "bundle": str(args.bundle), "cpu": cpu_model(),
              "isa_tier": active_tier(), "load_average": os.getloadavg(), "batches": args.batches,
              "rows": [args.min_rows, args.max_rows], "distinct_sizes": len(pool), "mean_rows": mean, "paths": {}}
    for path in b.paths:
        fix = stream_ms(pred, path, [fixed[k % len(fixed)] for k in range(args.batches)])
        var = stream_ms(pred, path, varying)
        row = {"fixed_first_quarter_ms": float(fix[:q].mean()), "fixed_steady_ms": float(fix[h:].mean()),
               "varying_first_quarter_ms": float(var[:q].mean()), "varying_steady_ms": float(var[h:].mean())}
        row["penalty"] = row["varying_steady_ms"] / row["fixed_steady_ms"]
        result["paths"][path] = row
        print(f"{path:16s} fixed {mean} rows {row['fixed_steady_ms']:.2f} ms, varying {args.min_rows}-"
              f"{args.max_rows} {row['varying_steady_ms']:.2f} ms (first quarter {row['varying_first_quarter_ms']:.2f}): "
              f"penalty {row['penalty']:.2f}x", file=sys.stderr, flush=True)
    text = json.dumps(result, indent=1) + "\n"
    if args.output:
        write_text(args.output, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
