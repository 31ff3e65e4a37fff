"""Per-stage latency of one model in torch eager, onnxruntime (fp32, int8 MLPs) and TVM, one thread.

    PYTHONPATH=. python benchmarks/tvm_stages.py --model demo/model.pt --data demo/day_1.npz \
        --batch-sizes 1,512,2048 --rounds 5 --json stages.json
    PYTHONPATH=. python benchmarks/tvm_stages.py --model /tmp/kaggle/model.safetensors \
        --batch-sizes 1,2048 --json stages.json          # no data file: synthetic batches

Stages (the same math in every engine, each compiled on its own with dynamic shapes, exported
inside ``rewrite.core.bag_ops.lowering()`` as the targets export them):
  embedding    bags -> [B, F, D]      every table's lookup and pooling
  bottom       dense -> x             bottom MLP
  interaction  (x, e_0..e_{F-1}) -> z dot interaction (each e_f [B, D], as the model has them)
  top          z -> logits            top MLP
  full         the whole model        (the onnx-cpu, onnx-cpu-int8 and tvm-llvm targets' own
                                      lowerings and runners)
Engines: torch (eager), onnxruntime (onnx-cpu's export form and session options),
onnxruntime-int8 (the same with the MLP stages quantized as onnx-cpu-int8 does; embedding and
interaction are fp32 there, so the same graphs), tvm (tvm-llvm's import and rewrites).
Each engine runs in its own process per round (rounds alternate the engine order), on fresh
batches (a different batch every call), warm-up first; a process reports the median per call,
the result is the median over rounds; ``--engines`` runs a subset (torch always: the ratios).
Batches come from ``--data``, or without it from ``rewrite.core.timing.serving_batches`` (one id
per bag, ids uniform over each table).  A stage's inputs are converted to the engine's tensors
before timing (inside the model they are already there: 27 numpy -> engine conversions would
dominate the interaction at B = 1); onnxruntime's stages are timed through both of its call
paths, each with a cost the model does not have, and the faster counts (``onnx_runners``; both
are in the JSON as ``stage/B@run`` and ``stage/B@bound``).  The full model is timed from numpy
through each target's runner, conversion included.
Compiled stages are cached under ``--cache``/<fingerprint of rewrite/ and targets/ sources>, so
a change to a lowering never reuses a stale build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rewrite.core import atomic
from rewrite.core.timing import median_ms

ENGINES = ("torch", "onnxruntime", "onnxruntime-int8", "tvm")
STAGES = ("embedding", "bottom", "interaction", "top", "full")
FRESH = 8           # distinct batches cycled per (stage, batch size)
WARMUP, CALLS = 3, 24


class Embeddings(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *bags):
        m = self.model
        return torch.stack([m.embeddings[t](bags[2 * f], bags[2 * f + 1])
                            for f, t in enumerate(m.feature_tables)], dim=1)


class Interaction(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.interaction = model.interaction

    def forward(self, x, *embeddings):
        return self.interaction(x, list(embeddings))


class Top(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.top = model.top

    def forward(self, z):
        return self.top(z).squeeze(1)


def stage_module(model, stage: str) -> nn.Module:
    from targets.base import ExportedBags

    return {"embedding": lambda: Embeddings(model), "bottom": lambda: model.bottom,
            "interaction": lambda: Interaction(model), "top": lambda: Top(model),
            "full": lambda: ExportedBags(model)}[stage]().eval()


def stage_inputs(model, stage: str, batch) -> list[np.ndarray]:
    """Numpy inputs of one stage for one canonical batch (upstream stages computed in torch)."""
    from rewrite.core.batch import split_bags_np

    bags = split_bags_np(batch.indices.numpy(), batch.offsets.numpy(), len(model.spec.features))
    dense = batch.dense.numpy()
    with torch.no_grad():
        x = model.bottom(batch.dense)
        e = Embeddings(model)(*[torch.from_numpy(b) for b in bags])
        z = Interaction(model)(x, *e.unbind(1))
    return {"embedding": bags, "bottom": [dense],
            "interaction": [x.numpy(), *(np.ascontiguousarray(f) for f in e.numpy().transpose(1, 0, 2))],
            "top": [z.numpy()], "full": [dense, *bags]}[stage]


def export_stage(model, stage: str):
    """torch.export of a stage with dynamic batch (and lookup counts), like targets.tvm.relax."""
    import torch.fx.experimental._config as fx_config
    from torch.export import Dim

    from targets.tvm.relax import trace_inputs

    traced = trace_inputs(model)
    b, offsets = Dim("batch", min=1), Dim("offsets", min=2)
    # alone, the embedding stage sees the batch only as B + 1 (offsets): name that dim, so the
    # Relax VM can read it from an input shape
    bag_dims = tuple({0: Dim(f"n_{i // 2}", min=0) if i % 2 == 0 else (b + 1 if stage == "full"
                                                                       else offsets)}
                     for i in range(len(traced) - 1))
    with torch.no_grad():
        x = model.bottom(traced[0])
        e = Embeddings(model)(*traced[1:])
        embs = tuple(f.contiguous() for f in e.unbind(1))
        z = Interaction(model)(x, *embs)
    args, shapes = {"embedding": (traced[1:], {"bags": bag_dims}),
                    "bottom": ((traced[0],), {"input": {0: b}}),
                    "interaction": ((x, *embs), {"x": {0: b},
                                                 "embeddings": tuple({0: b} for _ in embs)}),
                    "top": ((z,), {"z": {0: b}}),
                    "full": (traced, {"dense": {0: b}, "bags": bag_dims})}[stage]
    from rewrite.core import bag_ops

    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True, use_duck_shape=False), bag_ops.lowering():
        return torch.export.export(stage_module(model, stage), tuple(args), dynamic_shapes=shapes), args


def make_runners(engine: str, model, stage: str, cache: Path) -> dict[str, tuple]:
    """{call path: (convert, call)} for one engine and stage (compiled once into ``cache``):
    ``convert`` turns the numpy inputs into what ``call`` takes (not timed: inside the model they
    are the engine's tensors already), ``call`` runs the stage on them; the full model converts
    inside ``call``.  One call path ("") except onnxruntime's stages ("run", "bound")."""
    if engine == "torch":
        mod = stage_module(model, stage)

        def run_torch(xs):
            with torch.no_grad():
                return mod(*xs)

        return {"": ((lambda xs: [torch.from_numpy(x) for x in xs]), run_torch)}
    if engine.startswith("onnxruntime"):
        return onnx_runners(model, stage, cache, int8=engine.endswith("int8"))
    return {"": tvm_runner(model, stage, cache)}


def onnx_runners(model, stage: str, cache: Path, int8: bool) -> dict[str, tuple]:
    """onnx-cpu (or onnx-cpu-int8) for one stage: the whole model through the target itself,
    a stage as its own graph from the targets' export form (``targets.onnx.interaction``, int32
    pair indices), the MLP stages' Gemms quantized as onnx-cpu-int8 does; onnx_cpu's session
    (``onnx_session``: options, tables in huge pages), one thread.

    A stage has two call paths, each with a cost the model does not pay: "run" (``session.run``
    on numpy, the target's own call) converts every feed per call (~1 µs each: 27 of them
    outweigh the interaction at B = 1), "bound" (IOBinding, inputs and output bound before
    timing) copies the output per call (0.25-0.4 ms for a bare 3.5 MB Concat at B = 2048, where
    ``run`` takes 0.44 ms in all).  The worker reports both and takes the faster."""
    from targets.base import CompiledPath, get_target
    from targets.onnx.cpu import onnx_session, save_quantized
    from targets.onnx.interaction import int32_pair_indices, onnx_form

    name = "onnx-cpu-int8" if int8 else "onnx-cpu"
    if stage == "full":
        folder, target = cache / name, get_target(name)
        meta = folder / "compiled.json"
        if not meta.exists():
            from rewrite.core.synthetic import multi_hot_batch

            folder.mkdir(parents=True, exist_ok=True)
            rows = [model.embeddings[t].rows for t in model.feature_tables]
            cp = target.lower(model, multi_hot_batch(rows, 2, model.spec.n_dense, 1, 0), folder)
            meta.write_text(json.dumps(cp.__dict__))
        run = target.load(folder, CompiledPath(**json.loads(meta.read_text())), threads=1)
        return {"": (list, lambda xs: run(xs[0], list(xs[1:])))}
    quantize = int8 and stage in ("bottom", "top")
    path = cache / f"{stage}{'_int8' if quantize else ''}.onnx"
    if not path.exists():
        import torch.fx.experimental._config as fx_config

        from targets.onnx.bags import TRANSLATIONS

        ep, _ = export_stage(onnx_form(model), stage)
        with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False):
            program = torch.onnx.export(ep, (), dynamo=True, optimize=True, custom_translation_table=TRANSLATIONS)
        int32_pair_indices(program.model)
        if quantize:
            save_stage(path, lambda p: save_quantized(program, p, external=False, prefixes=("",)))
        else:
            save_stage(path, lambda p: program.save(str(p)))   # weights go to external data above 2 GB
    sess = onnx_session(path, 1, ["CPUExecutionProvider"])
    names, output = [i.name for i in sess.get_inputs()], sess.get_outputs()[0].name

    def bind(xs):
        """Inputs and the output bound once; the output to a buffer made here (unbound, onnxruntime
        allocates it per call and faults its pages in: ~160 minor faults per call for the
        interaction's 3 MB at B = 2048)."""
        out = sess.run(None, dict(zip(names, xs)))[0]
        binding = sess.io_binding()
        for name, x in zip(names, xs):
            binding.bind_cpu_input(name, x)
        binding.bind_output(output, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        binding.buffer = out                  # the bound output lives as long as the binding
        return binding

    return {"run": ((lambda xs: dict(zip(names, xs))), (lambda feeds: sess.run(None, feeds))),
            "bound": (bind, sess.run_with_iobinding)}


def save_stage(path: Path, save) -> None:
    """``save(tmp_path)`` in a temporary folder beside ``path``, then its files moved beside
    ``path`` (external data first, the .onnx file last: its existence marks a finished build)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        save(Path(tmp) / path.name)
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)


def tvm_runner(model, stage: str, cache: Path):
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from targets.base import CompiledPath, get_target

    target = get_target("tvm-llvm")
    folder = cache / f"tvm_{stage}"
    meta = folder / "compiled.json"
    if stage == "full":
        if not meta.exists():
            from rewrite.core.synthetic import multi_hot_batch

            rows = [model.embeddings[t].rows for t in model.feature_tables]
            cp = target.lower(model, multi_hot_batch(rows, 2, model.spec.n_dense, 1, 0), folder)
            meta.write_text(json.dumps(cp.__dict__))
        run = target.load(folder, CompiledPath(**json.loads(meta.read_text())))
        return list, lambda xs: run(xs[0], list(xs[1:]))
    from targets.tvm import relax as tvm_relax
    from targets.tvm.common import load_params, save_params, to_tvm

    if not meta.exists():
        folder.mkdir(parents=True, exist_ok=True)
        ep, _ = export_stage(model, stage)
        mod, params, names = target.prepare(*tvm_relax.to_relax(ep.run_decompositions(), "tvm-llvm"))
        tvm_target, _ = target.tvm_target({})
        target.build(mod, tvm_target, {}).export_library(str(folder / "model.so"))
        save_params(folder / "params.safetensors", params, names)
        meta.write_text(json.dumps({"params": names}))
    dev = tvm.cpu(0)
    vm = VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), dev)
    params = load_params(folder / "params.safetensors", json.loads(meta.read_text())["params"], dev)
    main = vm["main"]
    return (lambda xs: to_tvm(list(xs), dev)), lambda xs: main(*xs, *params)


def fresh_batches(model, data_path: str | None, size: int) -> list:
    """FRESH distinct canonical batches of ``size`` samples: rows of the data file in order, or
    synthetic serving batches (one uniform id per bag) when there is no data file."""
    from rewrite import data
    from rewrite.core.batch import Batch
    from rewrite.core.timing import serving_batches

    if data_path:
        ds = data.open(data_path)
        return [ds.batch(slice(k * size, (k + 1) * size)) for k in range(FRESH)]
    rows = [model.embeddings[t].rows for t in model.feature_tables]
    return [Batch(*(torch.from_numpy(a) for a in b))
            for b in serving_batches(rows, model.spec.n_dense, size, FRESH, seed=0)]


def source_fingerprint() -> str:
    """sha256 prefix of every lowering source (rewrite/, passes/, targets/, this file)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("rewrite/**/*.py"), *root.glob("passes/**/*.py"),
                        *root.glob("targets/**/*.py"), Path(__file__).resolve()]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def worker(args) -> dict:
    """One engine, one process: median ms per call for every stage and batch size."""
    from rewrite import formats

    torch.set_num_threads(1)
    model = formats.load(args.model).eval()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    for stage in STAGES:
        runners = make_runners(args.engine, model, stage, cache)
        for size in args.batch_sizes:
            batches = fresh_batches(model, args.data, size)
            for path, (convert, call) in runners.items():
                inputs = [convert(stage_inputs(model, stage, b)) for b in batches]
                out[f"{stage}/{size}{'@' + path if path else ''}"] = median_ms(call, inputs, WARMUP, CALLS)
            if len(runners) > 1:
                out[f"{stage}/{size}"] = min(out[f"{stage}/{size}@{path}"] for path in runners)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=None,
                    help="data file of batches (default: synthetic serving batches)")
    ap.add_argument("--batch-sizes", default="1,512,2048")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache", default=None,
                    help="compiled stages (default: <model dir>/stages/<source fingerprint>)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated subset of {','.join(ENGINES)} (torch always runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)   # worker mode
    args = ap.parse_args(argv)
    args.batch_sizes = [int(s) for s in str(args.batch_sizes).split(",")]
    engines = ("torch", *(e for e in ENGINES[1:] if e in args.engines.split(",")))
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engines: {', '.join(sorted(unknown))}")
    args.cache = args.cache or str(Path(args.model).parent / "stages" / source_fingerprint())
    if args.engine:
        print(json.dumps(worker(args)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"}
    rounds: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for engine in order:
            print(f"round {r + 1}/{args.rounds}: {engine}", file=sys.stderr)
            cmd = [sys.executable, __file__, "--engine", engine, "--model", args.model,
                   "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--cache", args.cache]
            cmd += ["--data", args.data] if args.data else []
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                sys.stderr.write(res.stderr[-3000:])
                return 1
            rounds[engine].append(json.loads(res.stdout.strip().splitlines()[-1]))
    table = {e: {k: float(np.median([rd[k] for rd in rs])) for k in rs[0]} for e, rs in rounds.items()}
    print(f"{'stage':12s} {'batch':>6s} " + " ".join(f"{e:>16s}" for e in engines)
          + "   " + " ".join(f"{e + '/torch':>22s}" for e in engines[1:]))
    for key in table["torch"]:
        stage, size = key.split("/")
        ms = [table[e][key] for e in engines]
        print(f"{stage:12s} {size:>6s} " + " ".join(f"{v:16.3f}" for v in ms)
              + "   " + " ".join(f"{v / ms[0]:22.2f}" for v in ms[1:]))
    if args.json:
        atomic.write_text(args.json, json.dumps({"ms_per_call": table, "rounds": args.rounds,
                                                 "batch_sizes": args.batch_sizes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
