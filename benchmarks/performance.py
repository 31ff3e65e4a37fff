"""Where the time goes on a Kaggle-shaped DLRM, per stage and whole model, eager vs the fast paths.

    PYTHONPATH=. python benchmarks/kaggle_model.py /tmp/kaggle/model.safetensors     # once
    PYTHONPATH=. python benchmarks/performance.py /tmp/kaggle/model.safetensors \
        --bundle /tmp/kaggle/bundle -o benchmarks/results/performance.json

One thread.  Two measurements, each with torch eager fp32 of the same model in the same run:
* whole model: ``rewrite.bench.run_bench`` (each figure also as a share of the host's limit,
  ``rewrite.cost.limit``, on this machine's measured ``cpu-local`` spec) on a bundle with the ``torch-fast`` and ``torch-fast-int8`` paths (compiled
  and verified here if missing) plus fbgemm's int8 TBE path: every contender in its own process,
  taking turns, medians; the timed call is ``Predictor.predict(..., validate=False)``, so batch-1
  latency includes the Python call, the runtime and the numpy <-> torch conversions;
* per stage, in this process (all torch, one thread pool): embedding (26 ``embedding_bag`` calls
  vs one fused call vs the C++ lookup on fp32 and fp16 tables vs fbgemm int8 TBE), bottom MLP,
  interaction, embedding + interaction (what torch-fast fuses into one C++ call), top MLP, whole
  model; variants
  alternate call by call, each on fresh batches of its own; medians.  Embedding rows/s = looked-up
  rows / embedding-stage time.
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
from torch import nn
from tqdm import tqdm

from rewrite.core.atomic import write_text

SIZES = (1, 2048)
STAGE_BATCHES = {1: 256, 2048: 8}      # fresh batches per size (B=1: many, to average the misses)
STAGE_ROUNDS = 5


def fused_embedding_bag(t, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One ``embedding_bag`` over the fused huge-page buffer of f32 tables (``FusedTables``) seen
    as W [Σ rows, d]: [B * F, d], feature-major."""
    w, feat, d = t.store.args()
    base = feat[:, 2]
    assert not feat[:, :2].any() and not (base % (4 * d)).any(), "f32 row tables, rows aligned"
    n_features = base.numel()
    counts = offsets[::(offsets.numel() - 1) // n_features].diff()     # lookups per feature [F]
    shifted = indices + torch.repeat_interleave(base // (4 * d), counts, output_size=indices.numel())
    weight = w[:w.numel() // (4 * d) * 4 * d].view(torch.float32).reshape(-1, d)
    mode = "mean" if feat[0, 5] else "sum"
    return torch.nn.functional.embedding_bag(shifted, weight, offsets, mode=mode, include_last_offset=True)


def gather(t):
    """``gather_bags`` over the tables of ``t`` (``FusedTables``), any row formats."""
    from targets.native.fast_kernels import kernels

    w, feat, d = t.store.args()
    return lambda b: kernels().gather_bags(w, b["indices"], b["offsets"], feat, d, t.pre(b["indices"], b["offsets"]))


def stage_functions(model, fast, fast8, tbe, compressed) -> dict[str, dict[str, Callable]]:
    """stage -> {variant: f(batch tensors) -> output}; eager first in each stage.  ``compressed``:
    label -> the fused tables of the model after that ``quantize`` (``compressed_tables``)."""
    from rewrite.core.model import split_bags

    n_features = len(model.spec.features)
    t = fast.tables
    mlp_kind = ("bf16 AMX, 1 call" if type(fast.bottom16).__name__ == "AmxMlp"
                else f"{str(fast.bottom16.dtype).removeprefix('torch.')} oneDNN")

    def eager_embed(b):
        bags = split_bags(b["indices"], b["offsets"], n_features)
        return [model.embeddings[name](bags[2 * f], bags[2 * f + 1]) for f, name in enumerate(model.feature_tables)]

    stages = {
        "embedding": {"eager fp32 (26 calls)": eager_embed,
                      "fused embedding_bag (1 call, huge pages)": lambda b: fused_embedding_bag(
                          t, b["indices"], b["offsets"]),
                      "C++ gather_bags (huge pages)": gather(t),
                      **{f"C++ gather_bags, {label} rows (quantize)": gather(c) for label, c in compressed.items()}},
        "bottom MLP": {"eager fp32": lambda b: model.bottom(b["dense"]),
                       f"torch-fast ({mlp_kind})": lambda b: fast.bottom16(b["dense"]),
                       "torch-fast-int8": lambda b: fast8.bottom8(b["dense"])},
        "interaction": {"eager fp32 (list)": lambda b: model.interaction(b["x"], b["embs"])},
        "embedding + interaction": {
            "eager fp32": lambda b: model.interaction(b["x"], eager_embed(b)),
            "torch-fast (C++ embed_interact)": lambda b: fast.lookup_interact(b["x"], b["indices"], b["offsets"]),
            "torch-fast-int8 (C++ embed_interact_q8, int8 out)": lambda b: fast8.lookup_interact(
                b["x"], b["indices"], b["offsets"], fast8.top8.kp)},
        "top MLP": {"eager fp32": lambda b: model.top(b["z"]),
                    f"torch-fast ({mlp_kind})": lambda b: fast.top16(b["z16"]),
                    "torch-fast-int8": lambda b: fast8.top8(b["z"])},
        "whole model": {"eager fp32": lambda b: model(b["dense"], b["indices"], b["offsets"]),
                        "torch-fast": lambda b: fast(b["dense"], b["indices"], b["offsets"]),
                        "torch-fast-int8": lambda b: fast8(b["dense"], b["indices"], b["offsets"])},
    }
    if tbe is not None:
        stages["embedding"]["fbgemm int8 TBE (1 call)"] = lambda b: tbe(b["indices"], b["offsets"])
    return stages


def runs_at(stage: str, variant: str, batch: int) -> bool:
    """Whether a path's stage form is what the path runs at this batch size: up to
    SMALL_MAX_BATCH samples both fast paths are one C++ call (only their whole model is timed),
    and torch-fast-int8's int8 forms start at INT8_MIN_BATCH."""
    from targets.native.engine import INT8_MIN_BATCH, SMALL_MAX_BATCH

    if stage == "whole model" or not variant.startswith("torch-fast"):
        return True
    if batch <= SMALL_MAX_BATCH:
        return False
    return not variant.startswith("torch-fast-int8") or batch >= INT8_MIN_BATCH


@torch.inference_mode()
def time_stages(model, fast, fast8, tbe, compressed, sizes=SIZES, seed: int = 1) -> list[dict[str, Any]]:
    """Medians per (batch size, stage, variant).  Every variant gets batches of its own: a batch's
    rows stay in this CPU's large L3 after one call, so a variant timed on a batch another just
    used would look faster than it is."""
    from rewrite.core.timing import serving_batches

    rows = [model.embeddings[t].rows for t in model.feature_tables]
    stages = stage_functions(model, fast, fast8, tbe, compressed)
    out = []
    for b in sizes:
        def fresh(k: int) -> list[dict[str, torch.Tensor]]:
            batches = []
            for d, i, o in serving_batches(rows, model.spec.n_dense, b, STAGE_BATCHES[b], seed * 1000 + k):
                t = {"dense": torch.from_numpy(d), "indices": torch.from_numpy(i), "offsets": torch.from_numpy(o)}
                t["x"] = model.bottom(t["dense"])
                t["embs"] = stages["embedding"]["eager fp32 (26 calls)"](t)
                t["z"] = model.interaction(t["x"], t["embs"])
                t["z16"] = nn.functional.pad(t["z"], (0, fast.kp - t["z"].shape[1])).to(torch.bfloat16)
                batches.append(t)
            return batches

        k = 0
        for name, variants in tqdm(stages.items(), desc=f"stages B={b}", file=sys.stderr, leave=False):
            variants = {v: f for v, f in variants.items() if runs_at(name, v, b)}
            own = {}
            for v in variants:
                own[v], k = fresh(k), k + 1
            secs: dict[str, list[float]] = {v: [] for v in variants}
            for v, f in variants.items():                     # warm-up
                f(own[v][0])
            for _ in range(STAGE_ROUNDS):
                for j in range(STAGE_BATCHES[b]):
                    for v, f in variants.items():             # variants alternate call by call
                        t0 = time.perf_counter()
                        f(own[v][j])
                        secs[v].append(time.perf_counter() - t0)
            base = float(np.median(secs[next(iter(variants))])) * 1e3
            for v, s in secs.items():
                ms = float(np.median(s)) * 1e3
                row = {"batch": b, "stage": name, "variant": v, "ms": ms, "speedup_vs_eager": base / ms}
                if name == "embedding":
                    row["rows_per_s"] = b * len(rows) / (ms / 1e3)
                out.append(row)
    return out


def compressed_tables(model, bits=(16, 8, 4)) -> dict:
    """torch-fast's fused tables of the model after ``quantize`` at each of ``bits`` (Kaggle-shaped:
    fp16 1.1 GB, int8 0.6 GB, int4 0.35 GB): label -> FusedTables."""
    import passes
    from rewrite.pass_manager import apply
    from targets.native.engine import FusedTables

    out = {}
    for b in bits:
        rewritten, _ = apply(model, [passes.quantize(bits=b)])
        out["fp16" if b == 16 else f"int{b}"] = FusedTables(rewritten)
    return out


def fbgemm_tbe(model):
    """fbgemm's int8 row-wise TBE over the model's tables, or None when fbgemm_gpu does not load."""
    from targets.base import get_target
    from targets.fbgemm.int8 import FbgemmDLRM, quantize_rows

    if get_target("fbgemm-int8").unavailable():
        return None
    tables = {n: quantize_rows(rep.weight.detach()) for n, rep in model.embeddings.items()}
    return FbgemmDLRM(model, tables).eval().tbe


def ensure_bundle(model_file: Path, bundle: Path) -> None:
    from rewrite.bundling import compile_model
    from rewrite.formats import load

    if not (bundle / "manifest.json").is_file():
        compile_model(load(model_file), bundle, ["torch-fast", "torch-fast-int8"], source=model_file, latency_sizes=(1, 2048))


def table(result: dict[str, Any]) -> str:
    lines = ["| batch | path | samples/s | p50 ms | speedup vs eager fp32 | host limit ms | of limit | max abs Δp |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["whole"]["results"]:
        limit = (f"{r['limit_ms']:.4f} ({r['mlp_dtype']} MLPs) | {r['of_limit']:.1%}" if "limit_ms" in r else " | ")
        lines.append(f"| {r['batch']} | {r['path']} | {r['samples_per_s']:,.0f} | {r['p50_ms']:.4f} | "
                     f"{r['speedup']:.2f}× | {limit} | {r['max_abs_prob_diff_vs_baseline']:.1e} |")
    lines += ["", "| batch | stage | variant | ms | speedup vs eager | rows/s |", "|---|---|---|---|---|---|"]
    for r in result["stages"]:
        rows = f"{r['rows_per_s'] / 1e6:.1f} M" if "rows_per_s" in r else ""
        lines.append(f"| {r['batch']} | {r['stage']} | {r['variant']} | {r['ms']:.4f} | "
                     f"{r['speedup_vs_eager']:.2f}× | {rows} |")
    return "\n".join(lines)


def plot(stages: list[dict[str, Any]], path: Path, batch: int = 2048) -> None:
    """Stacked bars: where one call's time goes, per path, at ``batch`` (stage medians, same run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rewrite.core.atomic import atomic_path

    ms = {(r["stage"], r["variant"]): r["ms"] for r in stages if r["batch"] == batch}

    def part(stage: str, prefix: str) -> tuple[str, str]:
        """(stage, the variant named ``prefix ...``): its MLP kind (AMX, oneDNN) is in the name."""
        return stage, next((v for s, v in ms if s == stage and v.startswith(prefix)), prefix)

    parts = ("embedding + interaction", "bottom MLP", "top MLP")
    paths = {"eager fp32": [(stage, "eager fp32") for stage in parts],
             "torch-fast": [part(stage, "torch-fast (") for stage in parts],
             "torch-fast-int8": [part(stage, "torch-fast-int8") for stage in parts]}
    fig, ax = plt.subplots(figsize=(8, 3.8))
    colours = dict(zip(parts, plt.cm.tab10.colors))
    for y, (name, parts) in enumerate(paths.items()):
        left = 0.0
        for stage, variant in parts:
            width = ms.get((stage, variant), 0.0)
            ax.barh(y, width, left=left, color=colours[stage], label=stage if y == 0 else None)
            left += width
        whole = ms.get(("whole model", name))
        if whole:
            ax.text(left, y, f"  whole call {whole:.2f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(paths)), list(paths))
    ax.set_xlabel(f"ms per call at batch {batch}, one thread (stage medians, same run)")
    ax.set_xlim(0, max(ms.values()) * 1.35)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


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
        from rewrite.cost.hardware import cpu_local

        ensure_bundle(args.model, args.bundle)
        result["whole"] = run_bench(args.bundle, list(SIZES), threads=1, rounds=args.rounds, hardware=cpu_local())
    from rewrite.formats import load
    from targets.native.engine import FastDLRM, FastInt8DLRM

    model = load(args.model).eval()
    fast = FastDLRM(model).eval()
    fast8 = FastInt8DLRM(model).eval()             # its own fused copy (2.2 GB), C++ lookup
    result["stages"] = time_stages(model, fast, fast8, fbgemm_tbe(model), compressed_tables(model))
    write_text(args.output, json.dumps(result, indent=1))
    plot(result["stages"], args.output.with_suffix(".png"))
    print(table(result if "whole" in result else {**result, "whole": {"results": []}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
