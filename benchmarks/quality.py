"""Quality benchmark: test AUC / log loss of every representation at ~10×, 100×, 1000× smaller
embeddings, fitted from the trained table and after recovery (distillation).

    PYTHONPATH=. python benchmarks/quality.py --demo /tmp/demo --out benchmarks/results/quality.json

Data: the demo (``examples/train_demo.py``, made in ``--demo`` if absent): the trained table DLRM
is the baseline; day 0 is used for the access profile, the pass verification sample and
recovery, day 1 only for the reported AUC / log loss.

Compression is the whole-model ratio of embedding bytes (``RecModel.embedding_bytes``), exact.
Allocation rule (fixed, not tuned on the test day): tables with fewer than ``min_rows`` rows stay
tables, ``min_rows`` the largest of 200 / 100 / 25 / 0 whose untouched tables take at most a
quarter of the budget; the others get one per-table ``compression`` found by bisection (fits
disabled) so the whole model lands at the target.  A row is ``label=PASS[+PASS...]`` in the
``-p`` grammar with ``{c}`` (per-table compression) and ``{steps}`` (fit steps; 0 while
calibrating) substituted, e.g. ``--row "tt=tt:compression={c}"`` or ``--row "int4=quantize:bits=4"``
(no ``{c}``: one point at its own ratio).  The "hot rows" reference keeps the top 1/target of
each table's rows exact and replaces the rest with the weighted mean row: its id map is not
counted, so it is a reference, not a representation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rewrite
from rewrite import data
from rewrite.core.atomic import atomic_path, write_text
from rewrite.core.pass_contract import ConfiguredPass, parse_pass
from rewrite.recovery import recover
from rewrite.training import evaluate

DEFAULT_ROWS = ("dhe=dhe:compression={c}:steps={steps}:batch_size=1024",
                "hybrid=hybrid:compression={c}:steps={steps}:batch_size=1024",
                "memrec=memrec:compression={c}:steps={steps}:batch_size=1024",
                "robe=robe:compression={c}")
KEEP_ROWS = (200, 100, 25, 0)          # candidate min_rows, largest first
KEEP_SHARE = 0.25                      # untouched tables may take this share of the budget
AUC_GOAL = 0.001                       # the goal: within 0.001 AUC of the table model


def build(template: str, c: float, steps: int, min_rows: int) -> list[ConfiguredPass]:
    out = []
    for text in template.format(c=f"{c:.6g}", steps=steps).split("+"):
        cp = parse_pass(text)
        out.append(ConfiguredPass(cp.name, dataclasses.replace(cp.config, min_rows=min_rows)))
    return out


def choose_min_rows(model: rewrite.RecModel, target: float) -> int:
    budget = model.embedding_bytes() / target
    for keep in KEEP_ROWS:
        kept = sum(t.num_bytes() for t in model.embeddings.values() if t.rows < keep)
        if kept <= KEEP_SHARE * budget:
            return keep
    return 0


def ratio(model, template, c, min_rows, prof, sample) -> float:
    rw, rep = rewrite.apply(model, build(template, c, 0, min_rows), profile=prof, sample=sample)
    return rep.embedding_bytes_before / rep.embedding_bytes_after


def calibrate(model, template, target, min_rows, prof, sample, iters: int = 9) -> float:
    """Smallest per-table compression (log bisection) whose whole-model ratio reaches ``target``."""
    lo, hi = math.log(target / 2), math.log(target * 64)
    if ratio(model, template, math.exp(hi), min_rows, prof, sample) < target:
        return math.exp(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(model, template, math.exp(mid), min_rows, prof, sample) < target else (lo, mid)
    return math.exp(hi)


def hot_rows_reference(model, prof, d1, target: float) -> dict:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in m.embeddings.items():
            counts = prof.counts(name)
            keep = max(1, int(round(t.rows / target)))
            cold = torch.from_numpy(np.argsort(-counts, kind="stable")[keep:].copy())
            w = torch.as_tensor(counts, dtype=torch.float32) + 1
            t.weight[cold] = (t.weight * w[:, None]).sum(0) / w.sum()
    ev = evaluate(m, d1)
    return {"label": "hot rows (reference)", "target": target, "compression": target,
            "auc": ev.auc, "logloss": ev.logloss}


def run_point(model, label, template, target, args, prof, sample, d0, d1) -> dict:
    min_rows = choose_min_rows(model, target) if target else 0
    t0 = time.perf_counter()
    c = calibrate(model, template, target, min_rows, prof, sample) if "{c}" in template else None
    calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    rw, rep = rewrite.apply(model, build(template, c or 0, args.fit_steps, min_rows), profile=prof, sample=sample)
    fit_seconds = time.perf_counter() - t0
    fitted = evaluate(rw, d1)
    point = {"label": label, "passes": [str(p) for p in build(template, c or 0, args.fit_steps, min_rows)],
             "target": target, "per_table_compression": c, "min_rows": min_rows,
             "embedding_bytes": rep.embedding_bytes_after,
             "compression": rep.embedding_bytes_before / rep.embedding_bytes_after,
             "tables_rewritten": sum(t.status == "rewritten" for t in rep.tables),
             "calibrate_seconds": calib, "fit_seconds": fit_seconds,
             "auc": fitted.auc, "logloss": fitted.logloss}
    if args.recover_epochs > 0:
        rec, rr = recover(model, rw, d0, epochs=args.recover_epochs, lr=args.recover_lr,
                          eval_data=d1, train_top=args.recover_top, seed=args.seed)
        point.update({"auc_recovered": rr.eval["auc_recovered"], "logloss_recovered": rr.eval["logloss_recovered"],
                      "logit_rmse": rr.eval["logit_rmse_rewritten"],
                      "logit_rmse_recovered": rr.eval["logit_rmse_recovered"],
                      "recover_seconds": rr.seconds, "recover_steps": rr.steps, "recover_best_step": rr.best_step})
    print(json.dumps({k: v for k, v in point.items() if k != "passes"}), file=sys.stderr)
    return point


def markdown(result: dict) -> str:
    base = result["baseline"]
    lines = [f"Baseline table DLRM: AUC {base['auc']:.4f}, log loss {base['logloss']:.4f}, "
             f"embeddings {base['embedding_bytes']:,} B (test: day 1, {base['rows']:,} rows).", "",
             "| representation | target | achieved | bytes | AUC fitted | AUC recovered | Δ AUC recovered | "
             "log loss recovered | fit s | recover s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        rec = p.get("auc_recovered")
        lines.append(f"| {p['label']} | {p['target']:g}× | {p['compression']:.1f}× | {p['embedding_bytes']:,} | "
                     f"{p['auc']:.4f} | {rec if rec is None else format(rec, '.4f')} | "
                     f"{'' if rec is None else format(rec - base['auc'], '+.4f')} | "
                     f"{p.get('logloss_recovered', float('nan')):.4f} | {p['fit_seconds']:.1f} | "
                     f"{p.get('recover_seconds', 0.0):.1f} |")
    for r in result["references"]:
        lines.append(f"| {r['label']} | {r['target']:g}× | (id map not counted) | | {r['auc']:.4f} | | | | | |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = result["baseline"]["auc"]
    ax.axhline(base, color="k", lw=1, label="table DLRM")
    ax.axhspan(base - AUC_GOAL, base, color="k", alpha=0.1, label=f"within {AUC_GOAL} AUC")
    labels = sorted({p["label"] for p in result["points"]})
    for i, label in enumerate(labels):
        pts = sorted((p for p in result["points"] if p["label"] == label), key=lambda p: p["compression"])
        x = [p["compression"] for p in pts]
        color = f"C{i}"
        ax.plot(x, [p["auc"] for p in pts], "o--", color=color, alpha=0.6, label=f"{label} fitted")
        if all("auc_recovered" in p for p in pts):
            ax.plot(x, [p["auc_recovered"] for p in pts], "o-", color=color, label=f"{label} recovered")
    refs = result["references"]
    if refs:
        ax.plot([r["compression"] for r in refs], [r["auc"] for r in refs], "x:", color="gray",
                label="hot rows + mean (reference)")
    ax.set_xscale("log")
    ax.set_xlabel("embedding compression (whole model, ×)")
    ax.set_ylabel("test AUC (day 1)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("demo"), help="demo dir (made if absent)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    ap.add_argument("--targets", default="10,100,1000", help="whole-model compression targets")
    ap.add_argument("--row", action="append", help="label=PASS_SPEC (repeatable; default: this branch's four)")
    ap.add_argument("--fit-steps", type=int, default=1000)
    ap.add_argument("--recover-epochs", type=float, default=1.0, help="0: no recovery")
    ap.add_argument("--recover-lr", type=float, default=5e-3)
    ap.add_argument("--recover-top", action=argparse.BooleanOptionalAction, default=True,
                    help="recovery also trains the top MLP (default on)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not (args.demo / "model.pt").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        import train_demo

        train_demo.main(["--out", str(args.demo)])
    model = rewrite.load(args.demo / "model.pt")
    d0, d1 = data.open(args.demo / "day_0.npz"), data.open(args.demo / "day_1.npz")
    prof = rewrite.profile(model, d0)
    sample = list(d0.batches(2048, limit=4096))
    base = evaluate(model, d1)
    targets = [float(t) for t in args.targets.split(",")]
    rows = [r.split("=", 1) for r in (args.row or DEFAULT_ROWS)]
    points = [run_point(model, label, template, t, args, prof, sample, d0, d1)
              for label, template in rows for t in (targets if "{c}" in template else [0.0])]
    result = {"command": " ".join(["benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
              "baseline": {"auc": base.auc, "logloss": base.logloss, "rows": base.n,
                           "embedding_bytes": model.embedding_bytes()},
              "settings": {k: str(v) for k, v in vars(args).items()},
              "points": points,
              "references": [hot_rows_reference(model, prof, d1, t) for t in targets]}
    write_text(args.out, json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    table = markdown(result)
    write_text(args.out.with_suffix(".md"), table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
