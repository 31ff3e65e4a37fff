"""Embedding stage (every table's lookup + pooling) in torch eager, onnxruntime and TVM, one thread.

    PYTHONPATH=. python benchmarks/embedding_lowering.py --max-rows 1000000 --json emb.json
    PYTHONPATH=. python benchmarks/embedding_lowering.py --model /tmp/kaggle/model.safetensors

The stage is ``bags -> [B, F, D]`` (``torch.stack`` of the tables' pooled bags) on the
Criteo-Kaggle-shaped model of ``benchmarks/kaggle_model.py`` (``--max-rows`` caps every table for
a smaller copy; ``--model`` reads a saved one instead).  Engines: torch eager (the tables'
``F.embedding_bag``), onnxruntime and TVM (tvm-llvm's target and pipeline) on the graphs the
lowerings produce (``rewrite.core.bag_ops`` ops translated by ``targets.onnx.bags`` /
``targets.tvm.bags``), compiled once into ``--cache``.  Each engine runs in its own process per
round, rounds alternate the order; fresh batches (``rewrite.core.timing.serving_batches``, one id per
bag like Criteo, a different batch every call), warm-up first, median per call per process,
median over rounds.  Inputs start as numpy arrays in every engine.  Also reports each engine's
max |difference| from eager on the first batch.  onnxruntime gets onnx-cpu's session
(``targets.onnx.cpu.onnx_session``: the tables read into huge pages at load).  ``--touch-pages``
first looks up one row per 4 KiB page of every table, so the timed calls see a serving
process's steady state (a first touch of a memory-mapped page faults it in).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks import tvm_stages
from rewrite.core import atomic
from rewrite.core.timing import median_ms

ENGINES = ("torch", "onnxruntime", "tvm")
FRESH, WARMUP, CALLS = 16, 4, 48
PAGE = 4096                 # bytes: one lookup per page touches every page of a table
TOUCH_BATCH = 65536


def load_model(args):
    from benchmarks.kaggle_model import kaggle_model
    from rewrite import formats
    from rewrite.core.synthetic import KAGGLE_ROWS

    if args.model:
        return formats.load(args.model).eval()
    return kaggle_model(tuple(min(r, args.max_rows) for r in KAGGLE_ROWS)).eval()


def export_stage(model) -> torch.export.ExportedProgram:
    """The embedding stage as ``benchmarks.tvm_stages`` exports it (under ``bag_ops.lowering()``)."""
    return tvm_stages.export_stage(model, "embedding")[0]


def compile_stage(engine: str, model, cache: Path) -> None:
    if engine == "onnxruntime" and not (cache / "embedding.onnx").exists():
        from targets.onnx.bags import TRANSLATIONS

        program = torch.onnx.export(export_stage(model), (), dynamo=True, opset_version=18,
                                    custom_translation_table=TRANSLATIONS)
        tvm_stages.save_stage(cache / "embedding.onnx", lambda p: program.save(
            str(p), external_data=model.embedding_bytes() > 2**30))
    if engine == "tvm" and not (cache / "tvm" / "compiled.json").exists():
        from targets.tvm import relax as tvm_relax
        from targets.base import get_target
        from targets.tvm.common import save_params

        target = get_target("tvm-llvm")
        mod, params, names = tvm_relax.to_relax(export_stage(model).run_decompositions(), target.name)
        tvm_target, _ = target.tvm_target({})
        (cache / "tvm").mkdir(parents=True, exist_ok=True)
        target.build(mod, tvm_target, {}).export_library(str(cache / "tvm" / "model.so"))
        save_params(cache / "tvm" / "params.safetensors", params, names)
        (cache / "tvm" / "compiled.json").write_text(json.dumps({"params": names}))


def make_runner(engine: str, model, cache: Path):
    """numpy bags -> numpy [B, F, D] for one engine (compiled stages read from ``cache``)."""
    if engine == "torch":
        stage = tvm_stages.Embeddings(model)

        def run_torch(bags):
            with torch.inference_mode():
                return stage(*[torch.from_numpy(b) for b in bags]).numpy()

        return run_torch
    if engine == "onnxruntime":
        from targets.onnx.cpu import onnx_session

        sess = onnx_session(cache / "embedding.onnx", 1, ["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        return lambda bags: sess.run(None, dict(zip(names, bags)))[0]
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from targets.tvm.common import load_params, set_threads, to_tvm

    set_threads(1)
    dev = tvm.cpu(0)
    folder = cache / "tvm"
    main = VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), dev)["main"]
    params = load_params(folder / "params.safetensors",
                         json.loads((folder / "compiled.json").read_text())["params"], dev)
    return lambda bags: main(*to_tvm(list(bags), dev), *params).numpy()


def fresh_bags(model, batch: int, seed: int) -> list[list[np.ndarray]]:
    from rewrite.core.timing import serving_batches
    from rewrite.core.batch import split_bags_np

    rows = [model.embeddings[t].rows for t in model.feature_tables]
    return [split_bags_np(idx, off, len(rows))
            for _, idx, off in serving_batches(rows, model.spec.n_dense, batch, FRESH, seed)]


def touch_pages(model, run) -> None:
    """Run ``run`` on batches whose ids hit every PAGE-byte page of every table once."""
    tables = [model.embeddings[t] for t in model.feature_tables]
    strides = [max(1, PAGE // (t.dim * t.weight.element_size())) for t in tables]
    pages = max(-(-t.rows // s) for t, s in zip(tables, strides))
    for start in range(0, pages, TOUCH_BATCH):
        page = np.arange(start, start + TOUCH_BATCH, dtype=np.int64)
        bags = []
        for t, stride in zip(tables, strides):
            bags += [(page * stride) % t.rows, np.arange(TOUCH_BATCH + 1, dtype=np.int64)]
        run(bags)


def worker(args) -> dict:
    """One engine, one process: median ms per call per batch size, and |Δ| vs eager."""
    torch.set_num_threads(1)
    model = load_model(args)
    cache = Path(args.cache)
    run = make_runner(args.engine, model, cache)
    ref = tvm_stages.Embeddings(model)
    if args.touch_pages:
        touch_pages(model, run)
    out: dict = {}
    for size in args.batch_sizes:
        inputs = fresh_bags(model, size, seed=size)
        with torch.inference_mode():
            want = ref(*[torch.from_numpy(b) for b in inputs[0]]).numpy()
        out[f"maxdiff/{size}"] = float(np.abs(run(inputs[0]) - want).max())
        out[f"ms/{size}"] = median_ms(run, inputs[:FRESH], WARMUP, CALLS)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a saved model (default: build the Kaggle shape)")
    ap.add_argument("--max-rows", type=int, default=1_000_000, help="cap on rows per table")
    ap.add_argument("--batch-sizes", default="1,2048")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache", default="/tmp/embedding_lowering", help="compiled stages")
    ap.add_argument("--touch-pages", action="store_true", help="fault in every table page first")
    ap.add_argument("--json", default=None)
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)   # worker mode
    args = ap.parse_args(argv)
    args.batch_sizes = [int(s) for s in str(args.batch_sizes).split(",")]
    if args.engine:
        print(json.dumps(worker(args)))
        return 0
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = load_model(args)
    for engine in ENGINES[1:]:
        print(f"compiling the embedding stage for {engine}", file=sys.stderr)
        compile_stage(engine, model, cache)
    del model
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"}
    rounds: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for r in range(args.rounds):
        for engine in ENGINES[r % 3:] + ENGINES[:r % 3]:
            print(f"round {r + 1}/{args.rounds}: {engine}", file=sys.stderr)
            cmd = [sys.executable, __file__, "--engine", engine, "--max-rows", str(args.max_rows),
                   "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--cache", args.cache]
            if args.model:
                cmd += ["--model", args.model]
            if args.touch_pages:
                cmd.append("--touch-pages")
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                sys.stderr.write(res.stderr[-3000:])
                return 1
            rounds[engine].append(json.loads(res.stdout.strip().splitlines()[-1]))
    table = {e: {k: float(np.median([rd[k] for rd in rs])) for k in rs[0]} for e, rs in rounds.items()}
    print(f"{'batch':>6s} " + " ".join(f"{e + ' ms':>15s}" for e in ENGINES) + "   ort/eager  tvm/eager")
    for size in args.batch_sizes:
        t, o, v = (table[e][f"ms/{size}"] for e in ENGINES)
        print(f"{size:6d} {t:15.3f} {o:15.3f} {v:15.3f}   {o / t:9.2f} {v / t:10.2f}")
    print("max |diff| vs eager: " + ", ".join(
        f"{e} {max(table[e][f'maxdiff/{s}'] for s in args.batch_sizes):.1e}" for e in ENGINES[1:]))
    if args.json:
        atomic.write_text(args.json, json.dumps({
            "ms_per_call": table, "rounds": args.rounds, "batch_sizes": args.batch_sizes,
            "model": args.model or f"kaggle_model(rows capped at {args.max_rows})",
            "threads": 1, "ids_per_bag": 1, "touch_pages": args.touch_pages,
            "per_round": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
