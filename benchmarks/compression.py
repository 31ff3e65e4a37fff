"""Compression benchmark: every representation at several settings on the demo's trained model.

    PYTHONPATH=. python examples/train_demo.py --out demo
    PYTHONPATH=. python benchmarks/compression.py --demo demo --out benchmarks/results

For each row of ``SETTINGS`` (the passes exactly as ``rewrite apply -p`` takes them): rewrite the
demo model with access weights profiled on the training day (day_0), then on the held-out day
(day_1) measure the embedding bytes ratio, |Δ logit| against the original, AUC and log loss
change, and the embedding-stage lookup throughput against fp32 ``nn.EmbeddingBag`` tables
(one thread, the two contenders alternating round by round, medians of rounds).  Writes
``compression.json`` and ``compression.png`` (bytes ratio vs AUC change, Pareto frontier
highlighted) and prints a markdown table.  Tolerance gates are recorded, not enforced.

To add a representation, add rows to ``SETTINGS``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import passes  # noqa: F401  (registers every pass)
import rewrite
from rewrite import data
from rewrite.core.atomic import atomic_path, write_text
from rewrite.core.model import RecModel
from rewrite.core.pass_contract import parse_pass
from rewrite.training import evaluate
from rewrite.core.batch import split_bags_np


@dataclass(frozen=True)
class Setting:
    name: str                    # the row's label
    family: str                  # representation family (the plot's colour)
    passes: tuple[str, ...]      # -p specs, run in order


SETTINGS: list[Setting] = [
    Setting("fp32 table (gather + segment-sum)", "table", ()),
    Setting("fp16", "quantize", ("quantize:bits=16",)),
    Setting("int8 row-wise", "quantize", ("quantize:bits=8",)),
    Setting("int4 row-wise", "quantize", ("quantize:bits=4",)),
    Setting("int2 row-wise", "quantize", ("quantize:bits=2",)),
    Setting("md energy 0.95", "md", ("md:energy=0.95",)),
    Setting("md energy 0.8", "md", ("md:energy=0.8",)),
    Setting("md energy 0.6", "md", ("md:energy=0.6",)),
    Setting("md popularity α=0.3", "md", ("md:rule=popularity",)),
    Setting("md popularity, budget 2 MiB", "md", ("md:rule=popularity:budget=2MiB",)),
    Setting("qr mult c=2", "qr", ("qr:collisions=2",)),
    Setting("qr mult c=4", "qr", ("qr:collisions=4",)),
    Setting("qr mult c=16", "qr", ("qr:collisions=16",)),
    Setting("qr add c=4", "qr", ("qr:collisions=4:op=add",)),
    Setting("qr concat c=4", "qr", ("qr:collisions=4:op=concat",)),
    Setting("hash c=2", "hash", ("hash:collisions=2",)),
    Setting("hash c=4", "hash", ("hash:collisions=4",)),
    Setting("hash c=16", "hash", ("hash:collisions=16",)),
    Setting("onehot (tables <= 128 rows)", "onehot", ("onehot",)),
    Setting("md 0.8, then int8 the rest", "mixed", ("md:energy=0.8", "quantize:bits=8")),
    Setting("qr c=4, then int4 the rest", "mixed", ("qr:collisions=4", "quantize:bits=4")),
    # passes II (tables with >= 200 rows, dlrm's QR/MD threshold)
    Setting("tt rank 8", "tt", ("tt:rank=8:min_rows=200",)),
    Setting("tt rank 16", "tt", ("tt:rank=16:min_rows=200",)),
    Setting("tt 20x", "tt", ("tt:compression=20:min_rows=200",)),
    Setting("tt rank 16 + cache of 50% of lookups", "tt", ("tt:rank=16:cache_coverage=0.5:min_rows=200",)),
    Setting("tt rank 16, int8 cores", "tt", ("tt:rank=16:core_bits=8:min_rows=200",)),
    Setting("prune-dims keep 0.5", "prune-dims", ("prune-dims:keep=0.5:min_rows=200",)),
    Setting("prune-dims keep 0.25", "prune-dims", ("prune-dims:keep=0.25:min_rows=200",)),
    Setting("prune-dims keep 0.1", "prune-dims", ("prune-dims:keep=0.1:min_rows=200",)),
    Setting("hot-cold 90% + int8", "hot-cold", ("hot-cold:coverage=0.9:min_rows=200",)),
    Setting("hot-cold 90% + prune-dims 0.25", "hot-cold",
            ("hot-cold:coverage=0.9:min_rows=200:cold=prune-dims:keep=0.25",)),
    Setting("hot-cold 16KiB + tt rank 8", "hot-cold", ("hot-cold:hot_bytes=16KiB:min_rows=200:cold=tt:rank=8",)),
]


def embedding_stage(model: RecModel, bags: list[torch.Tensor]):
    tables = [model.embeddings[t] for t in model.feature_tables]
    return lambda: [rep(bags[2 * f], bags[2 * f + 1]) for f, rep in enumerate(tables)]


def embedding_bag_stage(model: RecModel, bags: list[torch.Tensor]):
    """The reference: fp32 ``nn.EmbeddingBag`` (sum) holding the original tables."""
    tables = []
    for t in model.feature_tables:
        rep = model.embeddings[t]
        tables.append(torch.nn.EmbeddingBag.from_pretrained(rep.weight.detach(), mode=rep.pooling,
                                                            include_last_offset=True))
    return lambda: [eb(bags[2 * f], bags[2 * f + 1]) for f, eb in enumerate(tables)]


@torch.inference_mode()
def throughput(contender, reference, lookups: int, rounds: int, slice_s: float) -> tuple[float, float, float]:
    """Lookups/s of contender and reference (medians of rounds) and the median of the per-round
    speed ratios.  Each round times both for about ``slice_s`` seconds (calls per slice calibrated
    on a warm-up), alternating and flipping the order, so a ratio compares runs made within a
    fraction of a second of each other on this shared machine."""
    times: dict[int, list[float]] = {0: [], 1: []}
    fns = (contender, reference)
    reps = []
    for fn in fns:
        fn()
        t0 = time.perf_counter()
        fn()
        reps.append(max(1, round(slice_s / max(time.perf_counter() - t0, 1e-7))))
    for r in range(rounds):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / reps[k])
    ratio = statistics.median(r / c for c, r in zip(times[0], times[1]))
    return lookups / statistics.median(times[0]), lookups / statistics.median(times[1]), ratio


@torch.no_grad()
def logits(model: RecModel, ds: data.Dataset, batch: int = 8192) -> np.ndarray:
    return np.concatenate([model(*b.inputs()).numpy() for b in ds.batches(batch)])


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices not dominated in (larger ratio, larger AUC change)."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            keep.append(i)
    return keep


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    families = sorted({r["family"] for r in rows})
    colours = dict(zip(families, plt.cm.tab10.colors))
    for r in rows:
        ax.scatter(r["bytes_ratio"], r["auc_change"], color=colours[r["family"]], s=30, zorder=3)
        ax.annotate(r["name"], (r["bytes_ratio"], r["auc_change"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    front = sorted(pareto([(r["bytes_ratio"], r["auc_change"]) for r in rows]), key=lambda i: rows[i]["bytes_ratio"])
    ax.plot([rows[i]["bytes_ratio"] for i in front], [rows[i]["auc_change"] for i in front], "-o",
            color="black", mfc="none", ms=11, lw=1.2, zorder=2, label="Pareto frontier")
    for fam in families:
        ax.scatter([], [], color=colours[fam], label=fam)
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes ratio (original / rewritten)")
    ax.set_ylabel("AUC change on the held-out day")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title("Representations of the demo DLRM's tables")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    head = ("| representation | passes | bytes ratio | max / mean abs Δlogit | AUC change | logloss change "
            "| lookups/s vs EmbeddingBag |\n|---|---|---|---|---|---|---|")
    body = [f"| {r['name']} | `{' '.join(r['passes']) or '-'}` | {r['bytes_ratio']:.2f}x | "
            f"{r['max_abs_logit_diff']:.3f} / {r['mean_abs_logit_diff']:.4f} | {r['auc_change']:+.4f} | "
            f"{r['logloss_change']:+.4f} | {r['speed_vs_embedding_bag']:.2f}x |" for r in rows]
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("demo"), help="examples/train_demo.py's --out")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--batch", type=int, default=2048, help="samples per throughput batch")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--slice", type=float, default=0.03, help="seconds each contender runs per round")
    ap.add_argument("--only", nargs="*", help="run only the settings whose name contains one of these")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = rewrite.load(args.demo / "model.pt")
    train, held_out = data.open(args.demo / "day_0.npz"), data.open(args.demo / "day_1.npz")
    prof = rewrite.profile(model, train)
    sample = list(held_out.batches(4096, limit=8192))
    y = np.asarray(held_out.labels, dtype=np.float64)
    base_logits = logits(model, held_out)
    base = evaluate(model, held_out)
    b = held_out.batch(slice(0, args.batch))
    bags = [torch.from_numpy(a) for a in split_bags_np(b.indices.numpy(), b.offsets.numpy(), len(model.spec.features))]
    lookups = int(b.indices.numel())
    settings = [s for s in SETTINGS if not args.only or any(k in s.name for k in args.only)]
    rows = []
    for s in tqdm(settings, desc="settings", unit="setting", file=sys.stderr):
        t0 = time.perf_counter()
        rw, report = rewrite.apply(model, [parse_pass(p) for p in s.passes], profile=prof, sample=sample)
        fit_s = time.perf_counter() - t0
        ev = evaluate(rw, held_out)
        diff = np.abs(logits(rw, held_out) - base_logits)
        ours, ref, speed = throughput(embedding_stage(rw, bags), embedding_bag_stage(model, bags), lookups,
                               args.rounds, args.slice)
        rows.append({**asdict(s), "bytes": rw.embedding_bytes(), "bytes_ratio": model.embedding_bytes() / rw.embedding_bytes(),
                     "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                     "auc": ev.auc, "auc_change": ev.auc - base.auc, "logloss": ev.logloss,
                     "logloss_change": ev.logloss - base.logloss, "lookups_per_s": ours,
                     "embedding_bag_lookups_per_s": ref, "speed_vs_embedding_bag": speed,
                     "within_tolerance": report.ok, "fit_and_verify_s": fit_s,
                     "tables_rewritten": sorted({t.table for t in report.tables if t.status == "rewritten"})})
    result = {"model": str(args.demo / "model.pt"), "fit_profile": str(args.demo / "day_0.npz"),
              "held_out": str(args.demo / "day_1.npz"), "held_out_samples": int(len(y)),
              "embedding_bytes": model.embedding_bytes(), "auc": base.auc, "logloss": base.logloss,
              "throughput": {"batch": args.batch, "lookups_per_batch": lookups, "rounds": args.rounds,
                             "slice_s": args.slice, "threads": 1, "torch": torch.__version__},
              "pareto": [rows[i]["name"] for i in pareto([(r["bytes_ratio"], r["auc_change"]) for r in rows])],
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "compression.json", json.dumps(result, indent=1))
    plot(rows, args.out / "compression.png")
    print(f"{result['held_out_samples']:,} held-out samples, AUC {base.auc:.4f}, logloss {base.logloss:.4f}, "
          f"embeddings {model.embedding_bytes():,} B")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
