"""Throughput of the streamed Criteo TSV reader (lines/s, one thread), written as JSON.

    python benchmarks/tsv_reader.py --lines 200000 --out tsv_reader.json

Generates a Criteo-shaped TSV once (label, 13 ints with ~15% empty, 26 8-digit hex ids),
then times ``id_chunks`` (what ``rewrite profile`` reads) at sampling rates 1 and 0.05 and
``batches(2048)``, three rounds each, and reports medians.  Other jobs on a shared machine
inflate these times: the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from rewrite.core.atomic import write_text
from rewrite.data_formats.common import IdMap
from rewrite.data_formats.criteo_tsv import N_CAT, N_INT, open_tsv


def write_tsv(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for lo in range(0, n, 10000):
            m = min(10000, n - lo)
            ints = rng.integers(-2, 3000, (m, N_INT)).astype(str)
            ints[rng.random((m, N_INT)) < 0.15] = ""
            cats = np.char.mod("%08x", rng.integers(0, 2**32, (m, N_CAT), dtype=np.uint64))
            labels = (rng.random(m) < 0.3).astype(int).astype(str)
            f.writelines("\t".join([lab, *i, *c]) + "\n" for lab, i, c in zip(labels, ints, cats))


def timed(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--tsv", type=Path, default=Path("/tmp/dlrm_rewrite_bench.tsv"))
    ap.add_argument("--out", type=Path, default=Path("tsv_reader.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.tsv.exists():
        write_tsv(args.tsv, args.lines)
    ds = open_tsv(args.tsv, "log3", IdMap("mod", (10**6,) * N_CAT), skip_bad_rows=False)
    result = {"lines": args.lines, "load_average_1min": os.getloadavg()[0], "lines_per_s": {}}
    for rate in (1.0, 0.05):
        s = timed(lambda: sum(len(c) for c in ds.id_chunks(rate, 0, 65536)))
        result["lines_per_s"][f"id_chunks_rate_{rate}"] = args.lines / s
    s = timed(lambda: sum(b.size for b in ds.batches(2048)))
    result["lines_per_s"]["batches_2048"] = args.lines / s
    write_text(args.out, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
