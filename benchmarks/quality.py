"""Quality benchmark: test ΔAUC of each representation at several whole-model compressions, fitted
from the trained table and after recovery, on real data (MovieLens-100k) and on the realistic
synthetic generator; and whether ``rewrite plan --recover`` finds a plan within 0.001 AUC at 16×.

    PYTHONPATH=. nice -n 10 python benchmarks/quality.py --out benchmarks/results/quality.json

Models (made in ``--work`` if absent, seeded):
* ``movielens``: ``examples/movielens.py`` on ``.cache/data/ml-100k`` (``make install``): 11 tables of
  2–1,682 rows, d = 16; the profile on train.npz, recovery on train.npz plus ``--augment`` K (4)
  copies whose item side is permuted across rows (unlabelled: the teacher's logits are the
  targets; ``examples/movielens.py --augment``), AUC on test.npz (each user's last 10% of
  ratings), validation for the plan check only.
* ``synthetic``: ``SyntheticConfig(structure="lowrank")`` (``rewrite/core/synthetic.py``), the 26
  demo tables capped at ``--synthetic-rows``; a table DLRM trained one epoch on day 0, recovery on
  day 0, AUC on day 1; day 2 (a third of day 0's rows, seed 2) is the validation day of the plan
  check only.

Compression is the exact whole-model ratio of embedding bytes.  A point is ``PASS:compression=c``
on the tables of at least ``MIN_ROWS`` rows plus row-wise ``quantize`` (int4 below 30×, int2 from
30×) on the smaller ones (for ``mdq``: its own full-width form, ``mdq:bits=4|2:energy=1``), c found by bisection (fits disabled) so the whole model lands at the
target.  Recovery: ``rewrite.recovery.recover`` at its defaults, top MLP trained (``--recover-top``).
The plan check runs ``rewrite.plan`` with ``--memory-budget`` = MLPs + embeddings / R (R: the
data set's first goal, 16 on MovieLens, 100 on the synthetic), ``--max-auc-drop 0.001``, the
data set's grid (``PLAN_GRIDS``) and ``--recover`` the recovery data of the points (MovieLens: the
augmented rows, train.npz with ``--augment 0``; synthetic: day 0; ``--recover-top`` as the
points), measured on the validation
split (valid.npz, day 2), then compiles the plan (torch) with the tables fitted on that split, as
the plan measured them (``rewrite.compile(plan=...)`` also does so from the plan's ``fitted_on``),
and measures the bundle's test AUC.  A plan found within the bound counts towards the goal.
``--merge`` keeps the data sets of an existing ``--out`` that this run does not measure (each
entry says which command and commit measured it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import rewrite
from rewrite import data
from rewrite.core.atomic import atomic_path, write_text
from rewrite.core.pass_contract import ConfiguredPass, parse_pass
from rewrite.recovery import recover
from rewrite.training import evaluate

ROOT = Path(__file__).resolve().parents[1]
MIN_ROWS = 100                     # smaller tables get row-wise quantization instead
ROWS = {"movielens": ("mdq", "robe", "qr", "tt"), "synthetic": ("mdq", "tt", "robe")}     # `--rows` adds dhe, hybrid, ...
TARGETS = {"movielens": (8, 16, 50), "synthetic": (16, 100)}
GOALS = {"movielens": ((16, 0.001), (50, 0.005)), "synthetic": ((100, 0.001),)}
PLAN_GRID = {"robe": ["compression=16", "compression=24", "compression=32"],
             "qr": ["compression=16", "compression=24"], "tt": ["compression=16", "compression=24"],
             "quantize": ["bits=4", "bits=2"],
             "mdq": ["bits=4:compression=16", "bits=4:compression=24", "bits=4:compression=32",
                     "bits=8:energy=1", "bits=4:energy=1", "bits=2:energy=1"]}
# At 100x the large tables need under 5.1 bits per row: mdq's rank 1 / 2 / 4 factors (int4 r = 1 and
# int2 r = 2 pack two rows per byte) and full-width forms for the small tables; the hashed and TT
# forms of PLAN_GRID lose more than 0.001 at this ratio already as whole-model points (see the
# points), so they are not offered
SYNTHETIC_GRID = {"quantize": ["bits=4", "bits=2"],
                  "mdq": ["bits=4:inner_dim=1", "bits=4:inner_dim=2", "bits=2:inner_dim=2", "bits=4:inner_dim=4",
                          "bits=8:energy=1", "bits=4:energy=1", "bits=2:energy=1"]}
PLAN_GRIDS = {"movielens": PLAN_GRID, "synthetic": SYNTHETIC_GRID}


def build(rep: str, c: float, target: float) -> list[ConfiguredPass]:
    main = parse_pass(f"{rep}:compression={c:.6g}")
    bits = 4 if target < 30 else 2
    # mdq's own full-width form on the small tables: per-column scales, no 128-byte decode table
    rest = parse_pass(f"mdq:bits={bits}:energy=1" if rep == "mdq" else f"quantize:bits={bits}")
    return [ConfiguredPass(main.name, dataclasses.replace(main.config, min_rows=MIN_ROWS)), rest]


def ratio(model, rep, c, target, prof, sample) -> float:
    passes = build(rep, c, target)
    if rep in ("dhe", "hybrid", "memrec"):          # sizes do not depend on the fit: skip it
        passes[0] = ConfiguredPass(passes[0].name, dataclasses.replace(passes[0].config, steps=1))
    _, rep_ = rewrite.apply(model, passes, profile=prof, sample=sample)
    return rep_.embedding_bytes_before / rep_.embedding_bytes_after


def calibrate(model, rep, target, prof, sample, steps: int = 10) -> float:
    """Smallest per-table compression on a geometric grid [target/2, 8·target] whose whole-model
    ratio reaches ``target``; else the one reaching the largest ratio (a pass that cannot shrink
    a table that far skips it, so the ratio is not monotonic in c)."""
    grid = [target / 2 * 16 ** (i / (steps - 1)) for i in range(steps)]
    ratios = [ratio(model, rep, c, target, prof, sample) for c in grid]
    ok = [c for c, r in zip(grid, ratios) if r >= target]
    return ok[0] if ok else grid[max(range(steps), key=ratios.__getitem__)]


def run_point(model, rep, target, world, args) -> dict:
    train, test, prof, sample, base = world[:5]
    t0 = time.perf_counter()
    c = calibrate(model, rep, target, prof, sample)
    passes = build(rep, c, target)
    rw, report = rewrite.apply(model, passes, profile=prof, sample=sample)
    fit_s = time.perf_counter() - t0
    fitted = evaluate(rw, test)
    rec, rr = recover(model, rw, world_recover(world), train_top=args.recover_top, seed=args.seed)
    recovered = evaluate(rec, test)
    point = {"representation": rep, "target": target, "passes": [str(p) for p in passes],
             "per_table_compression": c, "embedding_bytes": report.embedding_bytes_after,
             "compression": report.embedding_bytes_before / report.embedding_bytes_after,
             "auc_fitted": fitted.auc, "auc_recovered": recovered.auc,
             "delta_auc_fitted": fitted.auc - base.auc, "delta_auc_recovered": recovered.auc - base.auc,
             "logloss_recovered": recovered.logloss, "fit_seconds": fit_s, "recover_seconds": rr.seconds,
             "recover_steps": rr.steps, "recover_best_step": rr.best_step, "recover_skipped": rr.skipped}
    print(json.dumps({k: v for k, v in point.items() if k != "passes"}), file=sys.stderr, flush=True)
    return point


def world_recover(world):
    """The data recovery trains on: the augmented rows where the data set has them, else train."""
    return world[5] if len(world) > 5 and world[5] is not None else world[0]


def augmented(work: Path, train_p: Path, copies: int) -> Path | None:
    """``work/ml100k/distill{K}.npz``: the training rows plus K copies whose item side is permuted
    across rows (``examples/movielens.py --augment``), unlabelled: recovery distils the teacher's
    logits on user x item pairs it never saw labelled."""
    if copies <= 0:
        return None
    out = train_p.parent / f"distill{copies}.npz"
    if not out.exists():
        import numpy as np

        sys.path.insert(0, str(ROOT / "examples"))
        import movielens

        z = np.load(train_p)
        xi, xc = movielens.augment(z["X_int"], z["X_cat"], copies, seed=0)
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, X_int=xi, X_cat=xc)
    return out


def movielens_model(work: Path):
    out = work / "ml100k"
    if not (out / "model.pt").exists():
        sys.path.insert(0, str(ROOT / "examples"))
        import movielens

        if movielens.main(["--src", str(ROOT / movielens.DEFAULT_SRC), "--out", str(out)]) != 0:
            raise SystemExit("MovieLens-100k is missing: run `make install`")
    return out / "model.pt", out / "train.npz", out / "test.npz", out / "valid.npz"


def synthetic_model(work: Path, max_rows: int, n_train: int):
    from rewrite.core.synthetic import Synthetic, SyntheticConfig, demo_rows, write_npz
    from rewrite.training import table_dlrm, train

    out = work / f"lowrank{max_rows}"
    gen = Synthetic(SyntheticConfig(rows=demo_rows(max_rows), structure="lowrank"))
    if not (out / "model.safetensors").exists():
        write_npz(out / "day_0.npz", *gen.sample(n_train, seed=0))
        write_npz(out / "day_1.npz", *gen.sample(n_train // 3, seed=1))
        model = table_dlrm(list(gen.cfg.rows))
        train(model, data.open(out / "day_0.npz"), epochs=1, lr=5e-3)
        rewrite.save(model, out / "model.safetensors")              # atomic: written last
    if not (out / "day_2.npz").exists():                            # the plan check's validation day
        write_npz(out / "day_2.npz", *gen.sample(n_train // 3, seed=2))
    return out / "model.safetensors", out / "day_0.npz", out / "day_1.npz", out / "day_2.npz"


def plan_check(model_path: Path, train: Path, test: Path, valid: Path, work: Path, candidates: int,
               ratio: float = 16, grid: dict = PLAN_GRID, recover_top: bool = False) -> dict:
    """`rewrite plan --memory-budget (MLPs + embeddings/ratio) --max-auc-drop 0.001 --recover DATA`
    (DATA: the augmented rows where made, else train.npz / day 0) on ``valid``, then the bundle's
    test AUC (its tables fitted on ``valid``, as the plan measured them)."""
    model = rewrite.load(model_path)
    budget = model.dense_bytes() + int(model.embedding_bytes() // ratio)
    grid_file, plan_file = work / f"grid_{model_path.parent.name}.json", work / f"plan_{model_path.parent.name}.json"
    grid_file.write_text(json.dumps(grid))
    t0 = time.perf_counter()
    out = {"memory_budget_bytes": budget, "embedding_ratio": ratio, "max_auc_drop": 0.001, "grid": grid,
           "recover_data": str(train), "recover_top": recover_top}
    try:
        plan = rewrite.plan(model_path, valid, hardware="cpu-local", memory_budget=budget, max_auc_drop=0.001,
                            grid=grid_file, samples=len(data.open(valid).labels), calibrate=False,
                            recover=train, recover_candidates=candidates, recover_top=recover_top,
                            output=plan_file)
    except rewrite.RewriteError as e:
        out.update(found=False, error=str(e), seconds=time.perf_counter() - t0)
        if plan_file.exists():
            plan_file.unlink()
        return out
    p0 = plan["paths"]["p0"]
    out.update(found=True, seconds=time.perf_counter() - t0,
               embedding_compression=model.embedding_bytes() / (p0["bytes"]["value"] - model.dense_bytes()),
               auc_drop_valid=p0["auc_drop"]["value"], candidates=plan["recovery"]["candidates_measured"],
               tables={t: e["pass"] for t, e in p0["tables"].items()})
    bundle = work / f"plan_bundle_{model_path.parent.name}"
    rewrite.compile(model_path, bundle, plan=plan_file, data=valid, targets=["torch"], force=True)
    served = rewrite.load(bundle / "rewritten" / "p0.safetensors")
    out["bundle_embedding_compression"] = model.embedding_bytes() / served.embedding_bytes()
    out["bundle_delta_auc_test"] = evaluate(served, data.open(test)).auc - evaluate(model, data.open(test)).auc
    return out


def goals(points: list[dict], ds: str, plan: dict | None = None) -> list[dict]:
    """Per goal, the largest ratio within its AUC drop: the points' and the plan bundle's (its
    test ΔAUC, at the bundle's embedding ratio)."""
    res = []
    if plan and plan.get("found"):
        points = [*points, {"representation": "plan", "compression": plan["bundle_embedding_compression"],
                            "delta_auc_recovered": plan["bundle_delta_auc_test"]}]
    for ratio_goal, drop in GOALS[ds]:
        within = [p for p in points if p["delta_auc_recovered"] >= -drop]
        best = max(within, key=lambda p: p["compression"], default=None)
        res.append({"goal": f">= {ratio_goal}x within {drop} AUC", "best_compression": best and best["compression"],
                    "by": best and best["representation"], "met": bool(best and best["compression"] >= ratio_goal)})
    return res


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], names):
        pts = result["datasets"][ds]["points"]
        for i, rep in enumerate(sorted({p["representation"] for p in pts})):
            mine = sorted((p for p in pts if p["representation"] == rep), key=lambda p: p["compression"])
            x = [p["compression"] for p in mine]
            ax.plot(x, [p["delta_auc_fitted"] for p in mine], "o--", color=f"C{i}", alpha=0.5, label=f"{rep} fitted")
            ax.plot(x, [p["delta_auc_recovered"] for p in mine], "o-", color=f"C{i}", label=f"{rep} recovered")
        plan = result["datasets"][ds].get("plan") or {}
        if plan.get("found") and "bundle_embedding_compression" in plan:      # the planned, recovered bundle
            ax.plot([plan["bundle_embedding_compression"]], [plan["bundle_delta_auc_test"]], "k*", ms=12,
                    label="plan bundle (recovered)")
        best = sorted(pts, key=lambda p: p["compression"])
        front, top = [], -1.0
        for p in reversed(best):                       # Pareto: no smaller ratio with a better ΔAUC
            if p["delta_auc_recovered"] > top:
                front.append(p)
                top = p["delta_auc_recovered"]
        ax.step([p["compression"] for p in reversed(front)], [p["delta_auc_recovered"] for p in reversed(front)],
                "k-", where="post", lw=2, alpha=0.4, label="Pareto (recovered)")
        for drop, ls in ((0.001, "-"), (0.005, ":")):
            ax.axhline(-drop, color="r", ls=ls, lw=1, label=f"−{drop} AUC")
        ax.set_xscale("log")
        ax.set_ylim(max(-0.08, min(p["delta_auc_fitted"] for p in pts) - 0.005), 0.005)
        ax.set_xlabel("embedding bytes ratio (whole model, ×)")
        ax.set_ylabel("ΔAUC on the test split")
        ax.set_title(f"{ds}: AUC {result['datasets'][ds]['baseline_auc']:.4f}")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("bench-quality"), help="models and data (made if absent)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    ap.add_argument("--datasets", default="movielens,synthetic")
    ap.add_argument("--synthetic-rows", type=int, default=5000, help="cap on the synthetic tables' rows")
    ap.add_argument("--synthetic-samples", type=int, default=150_000, help="day 0 rows (day 1: a third)")
    ap.add_argument("--recover-top", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--plan", action=argparse.BooleanOptionalAction, default=True,
                    help="run the plan --recover check (a plan within 0.001 AUC at the first goal's ratio)")
    ap.add_argument("--rows", help="representations, comma-separated, for every data set (default: ROWS)")
    ap.add_argument("--plan-candidates", type=int, default=2, help="plan --recover-candidates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--augment", type=int, default=4, metavar="K",
                    help="MovieLens: recovery (points and plan) on train + K item-permuted copies, "
                         "unlabelled (0: on train.npz)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the data sets of an existing --out that this run does not measure")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    command = " ".join(["benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"command": command, "settings": {k: str(v) for k, v in vars(args).items()}, "datasets": {}}
    measured = {"command": command, "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for ds in args.datasets.split(","):
        t_ds = time.perf_counter()
        model_path, train_p, test_p, valid_p = (movielens_model(args.work) if ds == "movielens"
                                                else synthetic_model(args.work, args.synthetic_rows,
                                                                     args.synthetic_samples))
        model = rewrite.load(model_path)
        train, test = data.open(train_p), data.open(test_p)
        prof = rewrite.profile(model, train)
        sample = list(train.batches(2048, limit=4096))
        base = evaluate(model, test)
        recover_p = augmented(args.work, train_p, args.augment) if ds == "movielens" else None
        world = (train, test, prof, sample, base, recover_p and data.open(recover_p))
        reps = args.rows.split(",") if args.rows else ROWS[ds]
        points = [run_point(model, rep, t, world, args) for rep in reps for t in TARGETS[ds]]
        entry = {"model": str(model_path), "recover_data": str(recover_p or train_p), "baseline_auc": base.auc, "baseline_logloss": base.logloss,
                 "test_rows": base.n, "embedding_bytes": model.embedding_bytes(), "points": points}
        if args.plan:
            entry["plan"] = plan_check(model_path, recover_p or train_p, test_p, valid_p, args.work,
                                       args.plan_candidates, ratio=GOALS[ds][0][0], grid=PLAN_GRIDS[ds],
                                       recover_top=args.recover_top)
            print(json.dumps(entry["plan"], default=str), file=sys.stderr, flush=True)
        entry["goals"] = goals(points, ds, entry.get("plan"))
        result["datasets"][ds] = {**entry, "measured": {**measured, "seconds": time.perf_counter() - t_ds}}
    result["seconds"] = time.perf_counter() - t_start
    if args.merge and args.out.exists():
        result = merged(json.loads(args.out.read_text()), result)
    write_text(args.out, json.dumps(result, indent=1, default=float))
    plot(result, args.out.with_suffix(".png"))
    table = markdown(result)
    write_text(args.out.with_suffix(".md"), table + "\n")
    print(table)
    return 0


def merged(old: dict, new: dict) -> dict:
    """``new`` with the data sets of ``old`` that it did not measure, in ``old``'s order first; a
    kept entry without ``measured`` gets ``old``'s command and seconds (files before ``--merge``)."""
    kept = {ds: {**e, "measured": e.get("measured", {"command": old.get("command"), "seconds": old.get("seconds")})}
            for ds, e in old.get("datasets", {}).items() if ds not in new["datasets"]}
    return {**new, "datasets": {**kept, **new["datasets"]}}


def git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else None


def markdown(result: dict) -> str:
    lines = []
    for ds, e in result["datasets"].items():
        m = e.get("measured", {})
        lines += [f"**{ds}**: baseline test AUC {e['baseline_auc']:.4f} ({e['test_rows']:,} rows), embeddings "
                  f"{e['embedding_bytes']:,} B, recovery on {Path(e.get('recover_data', 'train')).name}"
                  + (f"; measured by `{m['command']}`" if m.get("command") else "")
                  + (f" at {m['commit']}" if m.get("commit") else "")
                  + (f", {m['seconds'] / 60:.1f} min" if m.get("seconds") else ""), "",
                  "| representation | target | achieved | ΔAUC fitted | ΔAUC recovered | recovery steps | fit s | recover s |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in e["points"]:
            lines.append(f"| {p['representation']} | {p['target']}× | {p['compression']:.1f}× | "
                         f"{p['delta_auc_fitted']:+.4f} | {p['delta_auc_recovered']:+.4f} | "
                         f"{p['recover_steps']} | {p['fit_seconds']:.1f} | {p['recover_seconds']:.1f} |")
        lines.append("")
        for g in e["goals"]:
            best = "none" if g["best_compression"] is None else f"{g['best_compression']:.1f}× ({g['by']})"
            lines.append(f"- goal {g['goal']}: best {best}, {'met' if g['met'] else 'not met'}")
        if "plan" in e:
            p = e["plan"]
            lines.append(f"- plan --memory-budget {p['memory_budget_bytes']:,} B --max-auc-drop 0.001 --recover"
                         + (" --recover-top" if p.get("recover_top") else "") + ": "
                         + (f"found, {p['embedding_compression']:.1f}× embeddings, ΔAUC valid "
                            f"{-p['auc_drop_valid']:+.4f}, bundle ΔAUC test {p['bundle_delta_auc_test']:+.4f}"
                            if p["found"] else f"not found: {p['error']}") + f" ({p['seconds']:.0f} s)")
        lines.append("")
    lines.append(f"total {result['seconds'] / 60:.1f} min (this run)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
