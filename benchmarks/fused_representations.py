"""Each compressed representation's best fused path relative to the plain model's, in one run.

    PYTHONPATH=. python benchmarks/kaggle_model.py /tmp/kaggle/model.safetensors     # once
    PYTHONPATH=. python benchmarks/fused_representations.py /tmp/kaggle/model.safetensors \
        -o benchmarks/results/fused_representations_avx512.json
    REWRITE_ISA=avx2 PYTHONPATH=. python benchmarks/fused_representations.py ... -o ..._avx2.json

The Kaggle-shaped model (26 fp32 tables, d = 16) and the same model with its tables replaced
by each representation at the shapes its pass would produce (weights random at the table's
scale: speed does not depend on the values, and fitting 2 GB of tables would take longer than
the measurement): MD (inner dim 8), QR (mult, c = 4), hash (4 ids per bucket), prune-dims
(levels 16/8/4/0, a quarter of the rows each, PCA rotation), hot-cold (the first 1% of rows hot
in fp32, the rest int8 row-wise: with the uniform ids below 1% of lookups are hot, the
pessimistic case), TT (rank 16, 3 cores, tables >= 100k rows), DHE (a small decoder: k = 64
hashes, 64-16; compute, pooled by its own torch forward inside the engine); the compressing forms leave
tables of <= 200 rows plain (dlrm's QR / MD threshold).  Every model runs on the fused engine
(``FastInt8DLRM``: its bf16/fp32 form and its int8 form, both timed; "best" is the faster; the
lookup + interaction call alone is timed too, where the representations differ).
One thread; fresh uniform batches per contender (``rewrite.core.timing.serving_batches``);
the contenders take turns call by call; medians.  ratio = plain best ms / this model's best ms
(1.0: as fast as the plain model; the issue's goals: >= 0.8 for MD / QR / prune-dims /
hot-cold, >= 0.3 for TT).  Each best figure also as a share of the host's limit for that
model and path (``rewrite.cost.limit`` on ``--hardware``, default this machine's measured
``cpu-local``).  The load average is recorded before and after (a shared machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

SIZES = {1: 64, 2048: 8}        # batch -> fresh batches per contender
SMALL_TABLE = 200               # rows; dlrm's QR / MD threshold: smaller tables stay plain
TT_MIN_ROWS = 100_000
STD = 0.1                       # the Kaggle model's row scale (benchmarks/kaggle_model.py)


def _randn(*shape, g) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * STD


def md(rows, d, g):
    from passes.mixed_dim import MDBag

    rep = MDBag(rows, d, 8)
    rep.weight.data, rep.proj.data = _randn(rows, 8, g=g), _randn(d, 8, g=g)
    return rep


def qr(rows, d, g):
    from passes.quotient_remainder import QRBag

    rep = QRBag(rows, d, 4, op="mult")
    rep.weight_q.data, rep.weight_r.data = _randn(*rep.weight_q.shape, g=g), _randn(4, d, g=g)
    return rep


def hashed(rows, d, g):
    from passes.hashing import HashBag

    rep = HashBag(rows, d, -(-rows // 4), a=48271, b=11)
    rep.weight.data = _randn(rep.buckets, d, g=g)
    return rep


def pruned(rows, d, g):
    from passes.dim_pruning import PrunedDimBag

    levels = (d, d // 2, d // 4, 0)
    counts = [rows // 4] * 3 + [rows - 3 * (rows // 4)]
    rep = PrunedDimBag(rows, d, list(levels), counts)
    level = torch.randperm(rows, generator=g) % 4                      # each row's level, shuffled
    offset = torch.empty(rows, dtype=torch.int64)
    for l in range(4):
        mine = level == l
        offset[mine] = torch.arange(int(mine.sum()))
        if l in rep.stored:
            getattr(rep, f"block{l}").data = _randn(int(mine.sum()), levels[l], g=g)
    rep.remap.copy_((level * 2 ** rep.offset_bits + offset).to(rep.remap.dtype))
    rep.rotation.data = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    return rep


def hot_cold(rows, d, g):
    from passes.hot_cold_split import HotColdBag
    from passes.quantized import RowwiseQuantizedBag

    hot = max(1, rows // 100)
    cold, _ = RowwiseQuantizedBag.from_table(torch.cat([_randn(rows - hot, d, g=g), torch.zeros(1, d)]), 8)
    rep = HotColdBag(rows, d, hot, cold.spec(), remap_dtype="int32")
    rep.cold.packed.copy_(cold.packed)
    rep.hot.data = _randn(hot, d, g=g)
    ids = torch.arange(rows, dtype=torch.int64)
    rep.remap.copy_(torch.where(ids < hot, ids, -(ids - hot) - 1).to(torch.int32))
    return rep


def tt(rows, d, g):
    from passes import tt_fit
    from passes.tensor_train import TTBag

    p, q = tt_fit.factor_rows(rows, 3), tt_fit.factor_dim(d, 3)
    ranks = tt_fit.valid_ranks(p, q, (16, 16))
    rep = TTBag(rows, d, list(p), list(q), list(ranks))
    for k, (pk, r0, qk, r1) in enumerate(tt_fit.core_shapes(p, q, ranks)):
        getattr(rep, f"core{k}").data = torch.randn(pk, r0 * qk * r1, generator=g) * (STD / 8) ** (1 / 3) / (r0 * r1) ** 0.25
    return rep


def dhe(rows, d, g):
    from passes.dhe import DHEBag

    rep = DHEBag(rows, d, 64, (64,), buckets=1_000_000)
    for lin in rep.decoder.layers:
        lin.weight.data = torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5
        lin.bias.data.zero_()
    return rep


VARIANTS = {"md (inner 8)": (md, SMALL_TABLE), "qr (mult, c=4)": (qr, SMALL_TABLE),
            "hash (4 per bucket)": (hashed, SMALL_TABLE), "prune-dims (16/8/4/0)": (pruned, SMALL_TABLE),
            "hot-cold (1% fp32 + int8)": (hot_cold, SMALL_TABLE), "tt (rank 16)": (tt, TT_MIN_ROWS - 1),
            "dhe (k=64, 64-16; compute, pooled by torch)": (dhe, SMALL_TABLE)}


def fast_net(model):
    """The fused engine of ``model`` (both MLP forms), its unfused tables dropped."""
    from targets.native.engine import FastInt8DLRM

    net = FastInt8DLRM(model).eval()
    return net


def paths(net):
    """name -> f(dense, indices, offsets): the engine's bf16/fp32 form and its int8 form."""
    from targets.native.engine import FastDLRM

    return {"torch-fast": lambda *b: FastDLRM.forward(net, *b), "torch-fast-int8": lambda *b: net(*b),
            STAGE: lambda dense, i, o: net.lookup_interact(torch.ones(dense.shape[0], net.tables.dim), i, o)}


STAGE = "stage: lookup + interaction (one C++ call)"   # timed too, not a path: where the models differ


@torch.inference_mode()
def measure(nets: dict, rows: list[int], rounds: int, seed: int = 0) -> list[dict]:
    from rewrite.core.timing import serving_batches

    out = []
    for size, count in SIZES.items():
        calls = {(m, p): f for m, net in nets.items() for p, f in paths(net).items()}
        own = {k: [tuple(torch.from_numpy(a) for a in b) for b in serving_batches(rows, 13, size, count, seed + n)]
               for n, k in enumerate(calls)}
        for k, f in calls.items():                      # warm-up: first touch, lazy inits
            f(*own[k][0])
        secs = {k: [] for k in calls}
        for _ in tqdm(range(rounds), desc=f"B={size}", file=sys.stderr):
            for j in range(count):
                for k, f in calls.items():
                    t0 = time.perf_counter()
                    f(*own[k][j])
                    secs[k].append(time.perf_counter() - t0)
        for (m, p), s in secs.items():
            out.append({"batch": size, "model": m, "path": p, "median_ms": 1e3 * float(np.median(s)), "calls": len(s)})
    return out


def summarize(results: list[dict]) -> list[dict]:
    best = {}
    for r in results:
        if r["path"] == STAGE:
            continue
        key = (r["batch"], r["model"])
        best[key] = min(best.get(key, (np.inf, None)), (r["median_ms"], r["path"]))
    rows = []
    for (size, m), (ms, path) in best.items():
        plain = best[(size, "plain fp32")][0]
        rows.append({"batch": size, "model": m, "best_path": path, "best_ms": ms, "ratio_vs_plain": plain / ms})
    return rows


def add_limits(summary: list[dict], works: dict, hw) -> None:
    """Each best figure's host limit (its model, its path's MLP arithmetic, its batch) and share."""
    from rewrite.cost.limit import limit_fields
    from targets.base import get_target

    for r in summary:
        r.update(limit_fields(works[r["model"]], hw, get_target(r["best_path"]).precision, r["batch"], r["best_ms"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="written by benchmarks/kaggle_model.py")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="variant names (prefixes) to run; default all")
    ap.add_argument("--hardware", default="cpu-local", help="the spec of the host limit (rewrite hardware)")
    ap.add_argument("-o", "--output", type=Path, default=Path("fused_representations.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from rewrite.core import isa
    from rewrite.core.atomic import write_text
    from rewrite.cost.hardware import load_hardware
    from rewrite.cost.limit import model_work
    from rewrite.formats import load

    load_before = os.getloadavg()
    hw = load_hardware(args.hardware)
    model = load(args.model).eval()
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    sizes = {t: model.embeddings[t].rows for t in model.embeddings}
    nets, works = {"plain fp32": fast_net(model)}, {"plain fp32": model_work(model)}
    # every variant replaces the tables above TT_MIN_ROWS: drop their plain copies (2 GB; the
    # engine holds its own), keep the MLPs and the small tables
    from rewrite.core.embedding import TableBag

    model = model.with_tables({t: TableBag(r, 16, weight=torch.zeros(1, 16).expand(r, 16))
                               for t, r in sizes.items() if r >= TT_MIN_ROWS})
    gc.collect()
    g = torch.Generator().manual_seed(0)
    for name, (make, min_rows) in VARIANTS.items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        tables = {t: make(r, 16, g) for t, r in tqdm(sizes.items(), desc=name, file=sys.stderr) if r > min_rows}
        variant = model.with_tables(tables)
        nets[name], works[name] = fast_net(variant), model_work(variant)
        kinds = sorted(set(nets[name].tables.kinds))
        print(f"{name}: {len(tables)} tables replaced, kinds {kinds}", file=sys.stderr)
        del tables, variant
        gc.collect()
    results = measure(nets, rows, args.rounds)
    summary = summarize(results)
    add_limits(summary, works, hw)
    doc = {"benchmark": "fused_representations", "host": isa.cpu_model(),
           "isa_tier": isa.active_tier(), "threads": 1, "command": " ".join(sys.argv),
           "limit": {"hardware": hw.name, "source": hw.source, "gemm_kernels": hw.measurements.get("gemm_kernels", {})},
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "results": results, "summary": summary}
    stage = {(r["batch"], r["model"]): r["median_ms"] for r in results if r["path"] == STAGE}
    for r in summary:
        r["stage_ms"] = stage[(r["batch"], r["model"])]
        r["stage_ratio_vs_plain"] = stage[(r["batch"], "plain fp32")] / r["stage_ms"]
    print("| batch | model | best path | best ms | vs plain | of host limit | lookup + interaction ms | vs plain |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['batch']} | {r['model']} | {r['best_path']} | {r['best_ms']:.3f} | {r['ratio_vs_plain']:.2f}x "
              f"| {r['of_limit']:.0%} | {r['stage_ms']:.3f} | {r['stage_ratio_vs_plain']:.2f}x |")
    print(f"ISA tier {doc['isa_tier']}, load average {load_before[0]:.1f} before, {doc['loadavg_after'][0]:.1f} after")
    write_text(args.output, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
