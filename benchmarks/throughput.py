"""Throughput of every path of a bundle against torch eager fp32 of the original, in one run.

    PYTHONPATH=. python benchmarks/throughput.py BUNDLE --batch-sizes 1,64,512,2048 \
        -o throughput.json --plot throughput.png

Writes the JSON of ``rewrite bench --json`` (method: ``rewrite/bench.py``) and a plot of
samples/s per path against batch size, the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rewrite.core.atomic import atomic_path, write_text
from rewrite.bench import BASELINE, run_bench


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["path"] for r in result["results"]):
        pts = sorted((r["batch"], r["samples_per_s"]) for r in result["results"] if r["path"] == name)
        ax.plot(*zip(*pts), marker="o", linestyle="--" if name == BASELINE else "-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (samples)")
    ax.set_ylabel("samples/s (batch / p50 latency)")
    ax.set_title(f"{Path(result['bundle']).name}: {result['threads']} thread(s), same-run baseline")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batch-sizes", default="1,64,512,2048")
    ap.add_argument("--reference", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-o", "--output", type=Path, default=Path("throughput.json"))
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    result = run_bench(args.bundle, sizes, args.reference, args.threads, args.rounds)
    write_text(args.output, json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
