"""Where the time goes on a Kaggle-shaped DLRM, per stage and whole model, eager vs the fast paths.

    PYTHONPATH=. python benchmarks/kaggle_model.py /tmp/kaggle/model.safetensors     # once
    PYTHONPATH=. python benchmarks/performance.py /tmp/kaggle/model.safetensors \
        --bundle /tmp/kaggle/bundle -o benchmarks/results/performance.json

One thread.  Two measurements, each with torch eager fp32 of the same model in the same run:
* whole model: ``rewrite.bench.run_bench`` on a bundle with the ``torch-fast`` and ``torch-fast-int8`` paths (compiled
  and verified here if missing) plus fbgemm's int8 TBE path: every contender in its own process,
  taking turns, medians; the timed call is ``Predictor.predict(..., validate=False)``, so batch-1
  latency includes the Python call, the runtime and the numpy <-> torch conversions;
* per stage, in this process (all torch, one thread pool): embedding (26 ``embedding_bag`` calls
  vs one fused call vs fbgemm int8 TBE), bottom MLP, interaction, top MLP (fp32 vs the bf16 /
  stacked forms of ``targets.torch_fast``, the int8 MLPs and the C++ interaction), stages alternating call by call on fresh batches,
  medians.  Embedding rows/s = looked-up rows / embedding-stage time.
Writes JSON and prints a markdown table of both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from rewrite.atomic import write_text

SIZES = (1, 2048)
STAGE_BATCHES = {1: 256, 2048: 8}      # fresh batches per size (B=1: many, to average the misses)
STAGE_ROUNDS = 5


def stage_functions(model, fast, fast8, tbe) -> dict[str, dict[str, Callable]]:
    """stage -> {variant: f(batch tensors, precomputed) -> output}; eager first in each stage."""
    from rewrite.model import split_bags
    from targets.int8_kernels import kernels

    n_features = len(model.spec.features)

    def eager_embed(b):
        bags = split_bags(b["indices"], b["offsets"], n_features)
        return [model.embeddings[t](bags[2 * f], bags[2 * f + 1]) for f, t in enumerate(model.feature_tables)]

    stages = {
        "embedding": {"eager fp32 (26 calls)": eager_embed,
                      "fused fp32 (1 call)": lambda b: fast.tables(b["indices"], b["offsets"])},
        "bottom MLP": {"eager fp32": lambda b: model.bottom(b["dense"]),
                       "torch-fast (bf16)": lambda b: fast.mlp("bottom", b["dense"]),
                       "torch-fast-int8": lambda b: fast8.mlp("bottom", b["dense"])},
        "interaction": {"eager fp32 (list)": lambda b: model.interaction(b["x"], b["embs"]),
                        "torch-fast (stacked)": lambda b: fast.interact(b["x"], b["fused"]),
                        "C++ fused": lambda b: fast8.interact(b["x"], b["fused"]),
                        "C++ fused + int8 quantize": lambda b: kernels().dot_interaction_quant(
                            b["x"], b["fused"], fast8.pair_i, fast8.pair_j, fast8.top16.kp)},
        "top MLP": {"eager fp32": lambda b: model.top(b["z"]),
                    "torch-fast (bf16)": lambda b: fast.mlp("top", b["z"]),
                    "torch-fast-int8": lambda b: fast8.mlp("top", b["z"])},
        "whole model": {"eager fp32": lambda b: model(b["dense"], b["indices"], b["offsets"]),
                        "torch-fast": lambda b: fast(b["dense"], b["indices"], b["offsets"]),
                        "torch-fast-int8": lambda b: fast8(b["dense"], b["indices"], b["offsets"])},
    }
    if tbe is not None:
        stages["embedding"]["fbgemm int8 TBE (1 call)"] = lambda b: tbe(b["indices"], b["offsets"])
    stages["embedding"]["fused C++ prefetch"] = lambda b: kernels().fused_bags(
        fast8.tables.weight, b["indices"], b["offsets"], fast8.tables.base, fast8.tables.rows, False)
    return stages


@torch.inference_mode()
def time_stages(model, fast, fast8, tbe, sizes=SIZES, seed: int = 1) -> list[dict[str, Any]]:
    from rewrite.timing import serving_batches

    rows = [model.embeddings[t].rows for t in model.feature_tables]
    stages = stage_functions(model, fast, fast8, tbe)
    out = []
    for b in sizes:
        batches = []
        for d, i, o in serving_batches(rows, model.spec.n_dense, b, STAGE_BATCHES[b], seed):
            t = {"dense": torch.from_numpy(d), "indices": torch.from_numpy(i), "offsets": torch.from_numpy(o)}
            t["x"] = model.bottom(t["dense"])
            t["embs"] = stages["embedding"]["eager fp32 (26 calls)"](t)
            t["fused"] = fast.tables(t["indices"], t["offsets"])
            t["z"] = model.interaction(t["x"], t["embs"])
            batches.append(t)
        for name, variants in tqdm(stages.items(), desc=f"stages B={b}", file=sys.stderr, leave=False):
            secs: dict[str, list[float]] = {v: [] for v in variants}
            for f in variants.values():                       # warm-up
                f(batches[0])
            for _ in range(STAGE_ROUNDS):
                for t in batches:
                    for v, f in variants.items():             # variants alternate call by call
                        t0 = time.perf_counter()
                        f(t)
                        secs[v].append(time.perf_counter() - t0)
            base = float(np.median(secs[next(iter(variants))])) * 1e3
            for v, s in secs.items():
                ms = float(np.median(s)) * 1e3
                row = {"batch": b, "stage": name, "variant": v, "ms": ms, "speedup_vs_eager": base / ms}
                if name == "embedding":
                    row["rows_per_s"] = b * len(rows) / (ms / 1e3)
                out.append(row)
    return out


def fbgemm_tbe(model):
    """fbgemm's int8 row-wise TBE over the model's tables, or None when fbgemm_gpu does not load."""
    from targets.base import get_target
    from targets.fbgemm_int8 import FbgemmDLRM, quantize_rows

    if get_target("fbgemm-int8").unavailable():
        return None
    tables = {n: quantize_rows(rep.weight.detach()) for n, rep in model.embeddings.items()}
    return FbgemmDLRM(model, tables).eval().tbe


def ensure_bundle(model_file: Path, bundle: Path) -> None:
    from rewrite.compiler import compile_model
    from rewrite.formats import load

    if not (bundle / "manifest.json").is_file():
        compile_model(load(model_file), bundle, ["torch-fast", "torch-fast-int8"], source=model_file, latency_sizes=(1, 2048))


def table(result: dict[str, Any]) -> str:
    lines = ["| batch | path | samples/s | p50 ms | speedup vs eager fp32 | max abs Δp |", "|---|---|---|---|---|---|"]
    for r in result["whole"]["results"]:
        lines.append(f"| {r['batch']} | {r['path']} | {r['samples_per_s']:,.0f} | {r['p50_ms']:.4f} | "
                     f"{r['speedup']:.2f}× | {r['max_abs_prob_diff_vs_baseline']:.1e} |")
    lines += ["", "| batch | stage | variant | ms | speedup vs eager | rows/s |", "|---|---|---|---|---|---|"]
    for r in result["stages"]:
        rows = f"{r['rows_per_s'] / 1e6:.1f} M" if "rows_per_s" in r else ""
        lines.append(f"| {r['batch']} | {r['stage']} | {r['variant']} | {r['ms']:.4f} | "
                     f"{r['speedup_vs_eager']:.2f}× | {rows} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="written by benchmarks/kaggle_model.py")
    ap.add_argument("--bundle", type=Path, required=True, help="compiled here with torch-fast if missing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-whole", action="store_true", help="per-stage timings only")
    ap.add_argument("-o", "--output", type=Path, default=Path("performance.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result: dict[str, Any] = {"schema": "performance/1", "model": str(args.model), "threads": 1}
    if not args.skip_whole:
        from rewrite.bench import run_bench

        ensure_bundle(args.model, args.bundle)
        result["whole"] = run_bench(args.bundle, list(SIZES), threads=1, rounds=args.rounds)
    from rewrite.formats import load
    from targets.torch_fast import FastDLRM, FastInt8DLRM

    model = load(args.model).eval()
    fast = FastDLRM(model).eval()
    fast8 = FastInt8DLRM(model).eval()             # its own fused copy (2.2 GB), C++ lookup
    result["stages"] = time_stages(model, fast, fast8, fbgemm_tbe(model))
    write_text(args.output, json.dumps(result, indent=1))
    print(table(result if "whole" in result else {**result, "whole": {"results": []}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
