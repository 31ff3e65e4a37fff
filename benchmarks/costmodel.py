"""Is the cost model right?  Predicted vs measured latency and memory on this machine.

    PYTHONPATH=. python benchmarks/costmodel.py --out costmodel.json [--target torch|onnx-cpu]

A Criteo-Kaggle-shaped DLRM (26 tables, Kaggle row counts capped at --cap-rows, d = 16, random
weights: values do not change timing) is built in ten representations (every table with more
than 200 rows rewritten, as dlrm's QR/MD flags do; smaller tables stay plain, or become one-hot
GEMMs in "onehot-small").  For each (representation, batch size) the embedding stage and the whole
model are timed on fresh Zipf-distributed batches (the synthetic generator's ids), contenders
alternating round by round, medians of this thread's CPU time kept (the machine is shared: wall
time would count other jobs' scheduler slices; these runs are single-threaded); memory is the
tensor payload of the saved model.
Predictions come from the calibrated estimator (calibrated on *other* configurations:
``calibrate._configs``).  Reported: Spearman rank correlation within each batch size, median
absolute relative error, and, per batch size, whether the plan the selector picks (one
representation per table, lowest estimated latency, optional --memory-budget) measures within 10%
of the best measured configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import rewrite  # noqa: F401  (first: importing passes before rewrite is a circular import)
from passes.mixed_dim import MDBag
from passes.onehot import OneHotBag
from passes.quotient_remainder import QRBag
from rewrite.core.atomic import write_text
from rewrite.cost import microbench as mb
from rewrite.cost.calibrate import estimator_for, runner
from rewrite.cost.estimate import TableStats, coverage_curve, dense_facts
from rewrite.cost.hardware import load_hardware
from rewrite.cost.ilp import Constraints, Problem, solve
from rewrite.cost.variants import variant_of
from rewrite.core.embedding import TableBag
from rewrite.formats import native
from rewrite.core.model import ModelSpec, RecModel
from rewrite.core.synthetic import KAGGLE_ROWS, Synthetic, SyntheticConfig
from rewrite.core.units import parse_bytes

SMALL = 200          # rows: tables at or below stay plain (dlrm's --md/--qr threshold)
DIM = 16
REPRESENTATIONS = {  # name -> rows -> representation (None: a plain fp32 table)
    "table-fp32": lambda r: None,
    "table-bf16": lambda r: TableBag(r, DIM, dtype="bfloat16"),
    "table-fp16": lambda r: TableBag(r, DIM, dtype="float16"),
    "qr-mult-c4": lambda r: QRBag(r, DIM, 4),
    "qr-mult-c16": lambda r: QRBag(r, DIM, 16),
    "qr-mult-c64": lambda r: QRBag(r, DIM, 64),
    "qr-add-c16": lambda r: QRBag(r, DIM, 16, op="add"),
    "md-d4": lambda r: MDBag(r, DIM, 4),
    "md-d8": lambda r: MDBag(r, DIM, 8),
    "onehot-small": lambda r: None,
}


def build(name: str, rows: list[int], seed: int = 0) -> dict[str, torch.nn.Module]:
    g = torch.Generator().manual_seed(seed)
    tables = {}
    for i, r in enumerate(rows):
        if name == "onehot-small" and r <= 128:
            rep = OneHotBag(r, DIM)
        elif r <= SMALL or REPRESENTATIONS[name](r) is None:
            rep = TableBag(r, DIM)
        else:
            rep = REPRESENTATIONS[name](r)
        with torch.no_grad():
            for p in rep.parameters():
                p.copy_(torch.rand(p.shape, generator=g).to(p.dtype) * 0.02 - 0.01)
        tables[f"t{i}"] = rep.eval()
    return tables


class EmbeddingStage(torch.nn.Module):
    def __init__(self, model: RecModel):
        super().__init__()
        self.model = model

    def forward(self, *bags):
        return torch.cat([self.model.embeddings[t](bags[2 * f], bags[2 * f + 1])
                          for f, t in enumerate(self.model.feature_tables)], 1)


class WholeModel(EmbeddingStage):
    def forward(self, dense, *bags):
        return self.model.forward_bags(dense, list(bags))


def batches(gen: Synthetic, batch: int, n: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = torch.from_numpy(gen.ids(batch, rng))
        bags = []
        for f in range(ids.shape[1]):
            bags += [ids[:, f].contiguous(), torch.arange(batch + 1, dtype=torch.int64)]
        out.append((torch.from_numpy(rng.standard_normal((batch, 13)).astype(np.float32)), *bags))
    return out


def payload_bytes(model: RecModel, tmp: Path) -> int:
    native.save(model, tmp / "m.safetensors")
    raw = (tmp / "m.safetensors").read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


def timed_rounds(runs: dict[str, callable], inputs: list, rounds: int) -> dict[str, float]:
    """Median seconds per contender (this thread's CPU time), contenders alternating within each
    round, a fresh batch per round."""
    for run in runs.values():
        run(inputs[-1])                                    # warm-up
    times = {k: [] for k in runs}
    for r in range(rounds):
        for k, run in runs.items():
            t0 = mb.clock()
            run(inputs[r])
            times[k].append(mb.clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("costmodel.json"))
    ap.add_argument("--cap-rows", type=int, default=500_000)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 512, 2048])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--target", default="torch", choices=["torch", "onnx-cpu"])
    ap.add_argument("--memory-budget", default=None, help="for the plan check, e.g. 64MB")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    say = lambda m: print(f"[costmodel] {m}", file=sys.stderr, flush=True)  # noqa: E731
    hw = load_hardware("cpu-local")
    est = estimator_for(hw, args.target)
    rows = [min(r, args.cap_rows) for r in KAGGLE_ROWS]
    gen = Synthetic(SyntheticConfig(rows=tuple(rows), seed=0))
    spec = ModelSpec(13, (512, 256, 64, DIM), (512, 256, 1), tuple((f"f{i}", f"t{i}") for i in range(26)))
    profile_ids = gen.ids(200_000, np.random.default_rng(99))
    stats = {f"t{i}": TableStats(1.0, 1 / 26, coverage_curve(np.bincount(profile_ids[:, i], minlength=r)))
             for i, r in enumerate(rows)}
    torch.manual_seed(0)
    models = {}
    for name in REPRESENTATIONS:
        say(f"building {name}")
        base = models["table-fp32"] if models else None
        m = RecModel(spec, build(name, rows)).eval()
        if base is not None:
            m.bottom, m.top = base.bottom, base.top
        models[name] = m
    dense = dense_facts(models["table-fp32"])
    variants = {t: [] for t in models["table-fp32"].embeddings}
    for name, m in models.items():
        for t, rep in m.embeddings.items():
            if all(v.describe != rep.describe() for v in variants[t]):
                variants[t].append(variant_of(t, name, rep, "dram"))
    problem = Problem(variants, est, stats, dense, models["table-fp32"].dense_bytes())
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    results, plans, emb_runners, whole_runners = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        measured_bytes = {n: payload_bytes(m, tmp) for n, m in models.items()}
        for b in args.batches:
            choice = solve(problem, Constraints(memory_budget=budget), b).choice
            by_desc = {(v.table, v.describe): v for vs in variants.values() for v in vs}
            plan_tables = {t: next(models[n].embeddings[t] for n in models
                                   if models[n].embeddings[t].describe() == v.describe)
                           for t, v in choice.items()}
            plan_model = models["table-fp32"].with_tables(plan_tables)
            contenders = {**models, "plan": plan_model}
            inputs = batches(gen, b, args.rounds + 1, seed=b)
            say(f"batch {b}: timing {len(contenders)} contenders x {args.rounds} rounds ({args.target})")
            if not emb_runners:
                say(f"preparing {args.target} runners")
                for k, m in models.items():
                    emb_runners[k] = runner(args.target, EmbeddingStage(m), inputs[0][1:], tmp)
                    whole_runners[k] = runner(args.target, WholeModel(m), inputs[0], tmp)
            emb = {**emb_runners, "plan": runner(args.target, EmbeddingStage(plan_model), inputs[0][1:], tmp)}
            whole = {**whole_runners, "plan": runner(args.target, WholeModel(plan_model), inputs[0], tmp)}
            t_emb = timed_rounds({k: (lambda x, r=r: r(x[1:])) for k, r in emb.items()}, inputs, args.rounds)
            t_all = timed_rounds(whole, inputs, args.rounds)
            for name, m in contenders.items():
                ch = {t: by_desc[(t, rep.describe())] for t, rep in m.embeddings.items()}
                pred_emb = sum(problem.variant_cost(v, b).total for v in ch.values())
                row = {"representation": name, "batch": b,
                       "embedding_s": {"predicted": pred_emb, "measured": t_emb[name]},
                       "model_s": {"predicted": problem.plan_cost(ch, b).total, "measured": t_all[name]},
                       "bytes": {"predicted": problem.footprint(ch).total,
                                 "measured": measured_bytes.get(name) or payload_bytes(m, tmp)}}
                if name == "plan":
                    plans[b] = row
                else:
                    results.append(row)
            best = min((r for r in results if r["batch"] == b), key=lambda r: r["model_s"]["measured"])
            plans[b].update(choice={t: v.pass_spec for t, v in choice.items()},
                            best_config=best["representation"],
                            ratio_to_best=plans[b]["model_s"]["measured"] / best["model_s"]["measured"])
            plans[b]["within_10pct"] = plans[b]["ratio_to_best"] <= 1.10
            say(f"batch {b}: plan {plans[b]['model_s']['measured'] * 1e3:.2f} ms vs best "
                f"{best['representation']} {best['model_s']['measured'] * 1e3:.2f} ms")
    summary = summarise(results, plans, args.batches)
    report = {"machine": hw.notes, "load_average_1min": os.getloadavg()[0], "target": args.target,
              "estimator": {"source": est.source, "theta": list(est.theta)},
              "cap_rows": args.cap_rows, "rounds": args.rounds, "memory_budget": budget,
              "command": "PYTHONPATH=. python benchmarks/costmodel.py " + " ".join(argv or sys.argv[1:]),
              **summary, "plans": {str(b): p for b, p in plans.items()}, "configs": results}
    write_text(args.out, json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def summarise(results: list[dict], plans: dict, batch_sizes: list[int]) -> dict:
    def rel(rows, key):
        return [abs(r[key]["predicted"] / r[key]["measured"] - 1) for r in rows]

    per_batch = {}
    for b in batch_sizes:
        rows = [r for r in results if r["batch"] == b]
        per_batch[str(b)] = {
            f"spearman_{k}": float(spearmanr([r[f"{k}_s"]["predicted"] for r in rows],
                                             [r[f"{k}_s"]["measured"] for r in rows]).statistic)
            for k in ("embedding", "model")}
        per_batch[str(b)]["plan_within_10pct_of_best"] = plans[b]["within_10pct"]
    return {"configurations": len(results), "per_batch": per_batch,
            "median_abs_rel_error": {k: float(np.median(rel(results, k))) for k in ("embedding_s", "model_s", "bytes")},
            "max_abs_rel_error_bytes": float(max(rel(results, "bytes")))}


if __name__ == "__main__":
    sys.exit(main())
