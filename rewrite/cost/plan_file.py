"""The plan file (``rewrite plan -o plan.json``) and how ``rewrite compile --plan`` reads it.

Schema ``plan/1`` (every number is an object {"value", "source"} or names its source):

    {"schema": "plan/1",
     "model":    {"path": str, "tables": {name: {"rows", "dim", "representation"}}},
     "hardware": {"name", "kind", "source", "notes"},   "target": "torch" | "onnx-cpu" | ...,
     "batch": int,                                        reference batch of the objective
     "constraints": {"memory_budget_bytes", "max_auc_drop", "latency_target": {"seconds", "batch"}},
     "paths": {"p0": {"tables": {name: {"pass": "-p text" | null (keep), "describe", "tier",
                                        "bytes": {...}, "rel_error": {...}, "auc_drop": {...},
                                        "latency_s": {...}}},
                      "bytes": {...}, "latency_s": {batch: {...}}, "auc_drop": {...}}, ...},
     "dispatch": {"rule", "ranges": [{"min_batch", "max_batch" | null, "path"}], ...},
     "primary": "p0", "revisions": [...], "skipped": [...], "explain": [...]?, "pareto": [...]?,
     "fitted_on": {"data": str, "profile": str | null}?}   the files whose access profile weighted
                                                           the fits (``plan_inputs``)

``plan_to_passes(plan, path)`` turns a path into configured passes: tables sharing a setting
become one pass restricted to them (``tables=``), so the pass manager applies exactly the plan.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rewrite.core.atomic import write_text
from rewrite.core.errors import RewriteError
from rewrite.core.model import RecModel
from rewrite.core.pass_contract import ConfiguredPass, parse_pass

PLAN_SCHEMA = "plan/1"


def save_plan(plan: dict[str, Any], path: Path | str) -> None:
    write_text(path, json.dumps(plan, indent=1, default=float) + "\n")


def load_plan(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise RewriteError(f"{path}: no such plan file") from None
    except (OSError, ValueError) as e:
        raise RewriteError(f"{path}: not JSON ({e})") from None
    validate_plan(plan, str(path))
    return plan


def validate_plan(plan: Any, where: str = "plan") -> None:
    """Raise a RewriteError naming the first malformed part."""
    if not isinstance(plan, dict) or plan.get("schema") != PLAN_SCHEMA:
        got = plan.get("schema") if isinstance(plan, dict) else type(plan).__name__
        raise RewriteError(f"{where}: not a {PLAN_SCHEMA} plan (schema {got!r})")
    paths = plan.get("paths")
    if not isinstance(paths, dict) or not paths:
        raise RewriteError(f"{where}: 'paths' must be a non-empty object")
    for name, body in paths.items():
        tables = body.get("tables") if isinstance(body, dict) else None
        if not isinstance(tables, dict):
            raise RewriteError(f"{where}: paths.{name}.tables must be an object")
        for t, entry in tables.items():
            if not isinstance(entry, dict) or not (entry.get("pass") is None or isinstance(entry["pass"], str)):
                raise RewriteError(f"{where}: paths.{name}.tables.{t}.pass must be a string or null")
    ranges = plan.get("dispatch", {}).get("ranges")
    if not isinstance(ranges, list) or not ranges:
        raise RewriteError(f"{where}: dispatch.ranges must be a non-empty list")
    for i, r in enumerate(ranges):
        if not isinstance(r, dict) or r.get("path") not in paths or not isinstance(r.get("min_batch"), int):
            raise RewriteError(f"{where}: dispatch.ranges[{i}] needs min_batch (int), max_batch "
                               f"(int or null) and a path among {', '.join(paths)}")


def plan_to_passes(plan: dict[str, Any], path: str | None = None) -> list[ConfiguredPass]:
    """The configured passes that realise one path of the plan (default: the primary path)."""
    validate_plan(plan)
    name = path or plan.get("primary", "p0")
    if name not in plan["paths"]:
        raise RewriteError(f"plan has no path {name!r} (paths: {', '.join(plan['paths'])})")
    groups: dict[str, list[str]] = {}
    for table, entry in plan["paths"][name]["tables"].items():
        if entry["pass"] is not None:
            groups.setdefault(entry["pass"], []).append(table)
    out = []
    for text, tables in sorted(groups.items()):
        cp = parse_pass(text)
        out.append(ConfiguredPass(cp.name, dataclasses.replace(cp.config, tables=tuple(sorted(tables)))))
    return out


def plan_paths(plan: dict[str, Any]) -> dict[str, list[ConfiguredPass]]:
    """Every path's passes, by path name."""
    return {name: plan_to_passes(plan, name) for name in plan["paths"]}


def check_plan_matches(plan: dict[str, Any], model: RecModel, where: str = "plan") -> None:
    """The plan was made for this model: same tables, rows and dims."""
    expected = plan.get("model", {}).get("tables", {})
    for t, info in expected.items():
        rep = model.embeddings[t] if t in model.embeddings else None
        if rep is None or rep.rows != info.get("rows") or rep.dim != info.get("dim"):
            raise RewriteError(f"{where}: made for a different model (table {t}: plan "
                               f"{info.get('rows')}x{info.get('dim')}, model "
                               f"{'missing' if rep is None else f'{rep.rows}x{rep.dim}'})")
    missing = [t for t in model.embeddings if t not in expected]
    if missing:
        raise RewriteError(f"{where}: made for a different model (no entry for table(s) {', '.join(missing)})")


def plan_inputs(plan: dict[str, Any]) -> tuple[Path | None, Path | None, str | None]:
    """(data, profile, note) for ``compile --plan`` given neither ``--data`` nor ``--profile``: the
    files the plan's tables were fitted on (``fitted_on``) when they are still there, so the
    bundle's tables are the ones the plan measured; else (None, None, why not), and the tables
    are fitted with uniform row weights."""
    fitted = plan.get("fitted_on")
    if not isinstance(fitted, dict) or not isinstance(fitted.get("data"), str):
        return None, None, None
    data, profile = Path(fitted["data"]), fitted.get("profile")
    if not data.is_file() or (profile and not Path(profile).is_file()):
        missing = data if not data.is_file() else profile
        return None, None, (f"the plan's tables were fitted on {missing}, which is not there: fitting them with "
                            f"uniform row weights, so the bundle may not keep the plan's measured AUC (give --data)")
    return data, Path(profile) if profile else None, (f"fitting the tables on the plan's data {data}"
                                                      + (f" and profile {profile}" if profile else "")
                                                      + ", as `rewrite plan` measured them (--data picks another)")
