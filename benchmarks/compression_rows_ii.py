"""Representation passes II (tt, prune-dims, hot-cold): rows for ``benchmarks/compression.py``,
and a standalone measurement on the demo model until that benchmark exists.

    PYTHONPATH=. python benchmarks/compression_rows_ii.py --demo /tmp/demo --out passes_ii.json

For each row: embedding bytes before / after, held-out AUC and log loss (day_1) before and after,
and the lookup throughput of the rewritten largest table against ``nn.EmbeddingBag`` with the
same weights (batch of one-id bags drawn from day_1, one thread, contenders alternated round by
round, medians).  The profile is FAE-style: a 10% sample of the training day (day_0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import passes
import rewrite
from rewrite.atomic import write_text
from rewrite.passinfra import ConfiguredPass
from rewrite.training import evaluate

MIN_ROWS = 200          # leave tiny tables alone (dlrm's QR / MD threshold, NOTES-methods)


def rows_ii() -> list[tuple[str, ConfiguredPass]]:
    """(label, configured pass) for the compression benchmark's list."""
    s = {"min_rows": MIN_ROWS}
    return [
        ("tt rank 8", passes.tt(rank=(8,), **s)),
        ("tt rank 16", passes.tt(rank=(16,), **s)),
        ("tt 20x", passes.tt(compression=20, **s)),
        ("tt rank 16 + cache 50% lookups", passes.tt(rank=(16,), cache_coverage=0.5, **s)),
        ("tt rank 16 int8 cores", passes.tt(rank=(16,), core_bits=8, **s)),
        ("prune-dims keep 0.5", passes.prune_dims(keep=0.5, **s)),
        ("prune-dims keep 0.25", passes.prune_dims(keep=0.25, **s)),
        ("prune-dims keep 0.1", passes.prune_dims(keep=0.1, **s)),
        ("hot-cold 90% + fp16", passes.hot_cold(coverage=0.9, **s)),
        ("hot-cold 90% + prune-dims 0.25", passes.hot_cold(coverage=0.9, cold="prune-dims:keep=0.25", **s)),
        ("hot-cold 16KiB + tt rank 8", passes.hot_cold(hot_bytes="16KiB", cold="tt:rank=8", **s)),
    ]


def lookup_rate(module: torch.nn.Module, reference: torch.nn.EmbeddingBag, ids: torch.Tensor,
                rounds: int = 15) -> tuple[float, float]:
    """(module lookups/s, EmbeddingBag lookups/s), medians over alternated rounds."""
    offsets = torch.arange(ids.numel() + 1, dtype=torch.int64)
    times: dict[str, list[float]] = {"rep": [], "ref": []}
    with torch.no_grad():
        module(ids, offsets), reference(ids, offsets[:-1])              # warm-up
        for _ in range(rounds):
            for key, call in (("rep", lambda: module(ids, offsets)), ("ref", lambda: reference(ids, offsets[:-1]))):
                t0 = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - t0)
    return ids.numel() / statistics.median(times["rep"]), ids.numel() / statistics.median(times["ref"])


def measure(demo: Path, batch: int, limit: int | None) -> dict:
    torch.set_num_threads(1)
    model = rewrite.load(demo / "model.pt")
    prof = rewrite.profile(model, rewrite.data.open(demo / "day_0.npz"), sample_rate=0.1)
    held_out = rewrite.data.open(demo / "day_1.npz")
    base = evaluate(model, held_out, limit=limit)
    big = max(model.embeddings, key=lambda t: model.embeddings[t].rows)
    feature = model.feature_tables.index(big)
    ids = torch.from_numpy(np.asarray(held_out.cat[:batch, feature], dtype=np.int64))
    table = model.embeddings[big]
    reference = torch.nn.EmbeddingBag.from_pretrained(table.weight.detach(), mode="sum")
    table_rate, bag_rate = lookup_rate(table, reference, ids)
    out = {"model": str(demo / "model.pt"), "eval_samples": base.n, "auc_before": base.auc,
           "logloss_before": base.logloss, "throughput_table": big, "throughput_batch": batch,
           "tablebag_lookups_per_s": table_rate, "embeddingbag_lookups_per_s": bag_rate, "rows": []}
    for label, cp in rows_ii():
        t0 = time.perf_counter()
        rw, report = rewrite.apply(model, [cp], profile=prof)
        fit = time.perf_counter() - t0
        ev = evaluate(rw, held_out, limit=limit)
        rep = rw.embeddings[big]
        rate, ref_rate = lookup_rate(rep, reference, ids)
        out["rows"].append({
            "label": label, "pass": str(cp), "fit_seconds": fit,
            "embedding_bytes_before": report.embedding_bytes_before,
            "embedding_bytes_after": report.embedding_bytes_after,
            "compression": report.embedding_bytes_before / report.embedding_bytes_after,
            "tables_rewritten": sum(t.status == "rewritten" for t in report.tables),
            "auc_after": ev.auc, "auc_change": ev.auc - base.auc, "logloss_after": ev.logloss,
            "largest_table": rep.describe(), "lookups_per_s": rate,
            "vs_embeddingbag": rate / ref_rate})
        print(f"{label:34s} {out['rows'][-1]['compression']:7.2f}x  AUC {ev.auc:.4f} "
              f"({ev.auc - base.auc:+.4f})  {rate / 1e6:6.2f} M lookups/s ({rate / ref_rate:.2f}x EmbeddingBag)",
              file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="folder made by examples/train_demo.py")
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    ap.add_argument("--batch", type=int, default=4096, help="one-id bags per throughput call")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N held-out samples")
    args = ap.parse_args(argv)
    result = measure(args.demo, args.batch, args.limit)
    write_text(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
