"""What ``rewrite hardware`` and ``rewrite plan`` do, behind the thin click commands in cli.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rewrite.core.errors import RewriteError
from rewrite.inspection import human_bytes


def hardware_report(name: str, refresh: bool, target: str | None, presets: bool) -> dict[str, Any]:
    from rewrite.cost.calibrate import calibrate, stored_fit
    from rewrite.cost.hardware import PRESETS, load_hardware

    if presets:
        return {"presets": {k: PRESETS[k]().notes for k in sorted(PRESETS)}}
    hw = load_hardware(name, refresh=refresh)
    out = hw.to_json()
    if target:
        fit = calibrate(hw, target)
        out["calibration"] = {target: vars(fit)}
    elif hw.name == "cpu-local":
        out["calibration"] = {t: vars(f) for t in ("torch", "onnx-cpu") if (f := stored_fit(hw, t))}
    return out


def human_hardware(d: dict[str, Any]) -> str:
    if "presets" in d:
        return "\n".join(f"  {k:<16}{v}" for k, v in d["presets"].items())
    lines = [f"{d['name']} ({d['kind']}, {d['source']}): {d['cores']} cores"
             + (f", measured on {d['threads']} thread(s)" if d.get("threads") else ""),
             f"  {d['notes']}",
             f"  {'tier':<6}{'capacity':>12}{'bandwidth':>14}{'latency':>11}{'in flight':>11}  placeable"]
    for t in d["tiers"]:
        lines.append(f"  {t['name']:<6}{human_bytes(t['capacity']):>12}{t['bandwidth'] / 1e9:>10.1f} GB/s"
                     f"{t['latency'] * 1e9:>9.1f}ns{t['parallelism']:>11g}  "
                     f"{'no (cache)' if t['managed'] else 'yes'}")
    measured = d.get("measurements") or {}
    if measured.get("engine_tier_row_s"):
        lines.append("  random row through the fast engine's gather (the host limit takes the faster): "
                     + ", ".join(f"{t} {s * 1e9:.1f}ns" for t, s in measured["engine_tier_row_s"].items()))
    elif measured.get("engine_gather_missing"):
        lines.append(f"  fast engine's gather: not measured ({measured['engine_gather_missing']})")
    kernels = measured.get("gemm_kernels", {})
    for dtype, pts in d["gemm"].items():
        by = f" [{kernels[dtype]}]" if dtype in kernels else ""
        lines.append(f"  gemm {dtype:<5}{by} " + ", ".join(f"{r / 1e9:.0f} GFLOP/s @ {f / 1e6:.2g} MFLOP"
                                                   if f else f"{r / 1e12:.1f} TFLOP/s peak" for f, r in pts))
    lines.append(f"  per-call overhead {d['call_overhead'] * 1e6:.2f} us")
    for target, fit in (d.get("calibration") or {}).items():
        lines.append(f"  calibrated for {target}: theta {', '.join(f'{t:.3g}' for t in fit['theta'])} "
                     f"({fit['points']} points, median error {fit['median_rel_error']:.1%})")
    return "\n".join(lines)


def _constraints(memory_budget, max_auc_drop, latency_target, batch):
    from rewrite.cost.ilp import Constraints
    from rewrite.core.units import parse_bytes, parse_seconds

    if batch < 1:
        raise RewriteError(f"--batch must be >= 1, got {batch}")
    budget = parse_bytes(memory_budget) if memory_budget else None
    if budget is not None and budget <= 0:
        raise RewriteError("--memory-budget must be positive")
    if max_auc_drop is not None and not 0 <= max_auc_drop < 1:
        raise RewriteError(f"--max-auc-drop must be in [0, 1), got {max_auc_drop}")
    target = None
    if latency_target:
        text, at, b = latency_target.partition("@")
        if not at or not b.strip().isdigit() or int(b) < 1:
            raise RewriteError(f"--latency-target {latency_target!r}: write TIME@BATCH, e.g. 5ms@512")
        target = (parse_seconds(text), int(b))
    return Constraints(budget, max_auc_drop, target, memory_budget_text=memory_budget)


def _grid(path: Path | None):
    if path is None:
        return None
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RewriteError(f"{path}: no such grid file") from None
    except (OSError, ValueError) as e:
        raise RewriteError(f"{path}: not JSON ({e})") from None
    if not isinstance(d, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                          for v in d.values()):
        raise RewriteError(f'{path}: a grid is {{"pass": ["opt=v:opt=v", ...], ...}}')
    return {k: tuple(v) for k, v in d.items()}


def _recovery(recover_path, data_path, candidates: int, train_top: bool):
    from rewrite.cost.recovered import RecoverySettings

    if recover_path is None:
        if train_top:
            raise RewriteError("--recover-top only applies with --recover DATA")
        return None
    if candidates < 1:
        raise RewriteError(f"--recover-candidates must be >= 1, got {candidates}")
    if not Path(recover_path).exists():
        raise RewriteError(f"{recover_path}: no such data file")
    if Path(recover_path).resolve() == Path(data_path).resolve():
        raise RewriteError(f"--recover {recover_path} is the --data the plan measures AUC on: "
                           f"recover on data kept apart")
    return RecoverySettings(Path(recover_path), candidates, train_top)


def run_plan(model, model_path, data_path, hw_name, target, memory_budget, max_auc_drop,
             max_rel_error, latency_target, batch, samples, profile_path, grid_path, calibrate,
             explain, plot, output, recover_path: Path | None = None, recover_candidates: int = 3,
             recover_top: bool = False) -> dict[str, Any]:
    import torch

    from rewrite import data
    from rewrite.cost.calibrate import estimator_for
    from rewrite.cost.hardware import load_hardware
    from rewrite.cost.pareto import frontier, plot as plot_frontier
    from rewrite.cost.plan_file import save_plan
    from rewrite.cost.planner import build_problem, make_plan
    from rewrite.cost.select import explain as explain_plan
    from rewrite.core.access_profile import AccessProfile
    from rewrite.profiling import profile

    constraints = _constraints(memory_budget, max_auc_drop, latency_target, batch)
    if samples < 1:
        raise RewriteError(f"--samples must be >= 1, got {samples}")
    grid = _grid(grid_path)
    recovery = _recovery(recover_path, data_path, recover_candidates, recover_top)
    hw = load_hardware(hw_name)
    estimator = estimator_for(hw, target, calibrate_if_missing=calibrate)
    ds = data.open(data_path)
    data.check_matches(ds, model.spec.n_dense, len(model.spec.features))
    sample = list(ds.batches(4096, limit=samples))
    prof = (AccessProfile.load(profile_path, model) if profile_path
            else profile(model, ds, sample_rate=min(1.0, 1e6 / max(1, ds.n_samples))))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, hw.threads or threads))
    problem, enum = build_problem(model, estimator, sample, prof, grid, max_rel_error,
                                  keep_degraded=recovery is not None)
    plan, sel = make_plan(model, str(model_path), problem, enum, constraints, batch, target, sample, recovery)
    # the data whose access profile weighted the tables' fits: compile --plan fits them the same way
    plan["fitted_on"] = {"data": str(Path(data_path).resolve()),
                         "profile": str(Path(profile_path).resolve()) if profile_path else None}
    if memory_budget:
        plan["constraints"]["memory_budget_given"] = str(memory_budget)    # as written, e.g. 100KB
    if explain:
        plan["explain"] = explain_plan(problem, sel, batch)
    torch.set_num_threads(threads)
    points = frontier(problem, batch, max_auc_drop, enum.labelled)
    plan["pareto"] = {"axes": {"bytes": "counted", "latency_s": estimator.source,
                               "auc_drop_sum": "sum of per-table measured drops"},
                      "batch": batch, "points": points}
    if plot:
        p0 = plan["paths"]["p0"]
        chosen = {"bytes": p0["bytes"]["value"], "latency_s": p0["latency_s"][str(batch)]["value"]}
        plot_frontier(points, chosen, plot, f"{Path(model_path).name} on {hw.name} "
                      f"({estimator.source}), batch {batch}")
    if output:
        save_plan(plan, output)
    plan["written"] = {"plan": str(output) if output else None, "plot": str(plot) if plot else None}
    return plan


def limits_text(c: dict[str, Any]) -> str:
    """The plan's limits as the user gave them (the memory budget in their unit and in bytes)."""
    from rewrite.cost.ilp import Constraints

    parts = []
    if c.get("memory_budget_bytes") is not None:
        parts.append("memory budget " + Constraints(c["memory_budget_bytes"],
                                                    memory_budget_text=c.get("memory_budget_given")).budget_text())
    if c.get("max_auc_drop") is not None:
        parts.append(f"AUC drop <= {c['max_auc_drop']:g}")
    if c.get("latency_target"):
        lt = c["latency_target"]
        parts.append(f"latency <= {lt['seconds'] * 1e3:g} ms at batch {lt['batch']}")
    return ", ".join(parts) or "none (the fastest plan)"


def human_plan(d: dict[str, Any]) -> str:
    from rewrite.cost.variants import spelled
    from rewrite.dispatch import batch_range

    batch, est = d["batch"], d["estimator"]["source"]
    lines = [f"plan for {d['model']['path']} on {d['hardware']['name']} (target {d['target']}, "
             f"latency {est}), optimised for batch {batch}",
             f"  limits: {limits_text(d.get('constraints') or {})}"]
    for name, p in d["paths"].items():
        auc = p["auc_drop"]
        lines.append(f"  {name}: {human_bytes(p['bytes']['value'])} (counted), "
                     f"{p['latency_s'][str(batch)]['value'] * 1e3:.3f} ms @ {batch} ({est}), "
                     f"AUC drop {auc['value']:.4g} ({auc['source']})")
    p0 = d["paths"]["p0"]["tables"]
    rows = d.get("explain") or [{"table": t, "choice": e["pass"] or "keep", "describe": e["describe"],
                                 "bytes": e["bytes"]["value"], "binding": None, "runner_up": None}
                                for t, e in p0.items()]
    choice_w = max([22] + [len(spelled(r["choice"])) + 2 for r in rows])
    lines.append(f"  {'table':<8}{'choice':<{choice_w}}{'bytes':>12}  representation")
    for r in rows:
        line = f"  {r['table']:<8}{spelled(r['choice']):<{choice_w}}{human_bytes(r['bytes']):>12}  {r['describe']}"
        if r.get("binding"):
            ru = r["runner_up"]
            if ru is None:
                ru_text = "runner-up: none (the only variant)"
            elif ru["pass"] is None:
                ru_text = f"runner-up: none ({ru['reason']})"
            else:
                ru_text = f"runner-up {spelled(ru['pass'])} (+{max(0.0, ru['objective_increase_s']) * 1e6:.1f} us)"
            line += f"\n          {ru_text}; binding: {r['binding']}"
        lines.append(line)
    ranges = ", ".join(f"{batch_range(r['min_batch'], r['max_batch'])} -> {r['path']}"
                       for r in d["dispatch"]["ranges"])
    lines.append(f"  dispatch: {ranges}")
    if "max_batch_within_target" in d["dispatch"]:
        lines.append(f"  requests above {d['dispatch']['max_batch_within_target']} rows are split "
                     f"to meet {d['dispatch']['latency_target_s'] * 1e3:g} ms")
    if d["revisions"]:
        lines.append(f"  {len(d['revisions'])} plan(s) rejected after measuring their AUC as a whole")
    rec = d.get("recovery")
    if rec:
        lines.append(f"  recovery on {rec['data']}: {len(rec['candidates_measured'])} candidate(s) measured after it")
        for c in rec["candidates_measured"]:
            lines.append(f"    {'*' if c['chosen'] else ' '} {human_bytes(c['bytes'])}, AUC drop "
                         f"{c['auc_drop_estimated']:.4g} fitted (per-table sum) -> {c['auc_drop_recovered']:.4g} "
                         f"recovered ({c['recovery_steps']} steps, {c['seconds']:.0f} s)")
    if d["skipped"]:
        lines.append(f"  {len(d['skipped'])} (table, setting) pairs skipped (see --json: skipped)")
    for k, v in d["written"].items():
        if v:
            lines.append(f"{k} written to {v}")
    return "\n".join(lines)
