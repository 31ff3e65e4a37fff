"""``rewrite compile`` with passes: ``-p PASS ...`` or ``--plan plan.json``.

``-p``:  model -> passes (the gate of ``rewrite apply``) -> ``compile_model(rewritten, original=model)``.
``--plan``: model + plan/1 file -> per distinct plan path pK the plan's passes applied to the
original and verified against it (same gate; a plan made with ``--recover`` has its primary path
recovered as the plan's ``recovery`` recipe says, gated afterwards by ``rewrite verify`` as
``apply --recover`` is), stored as ``rewritten/pK.safetensors`` -> one path
``pK-<target>`` per requested target (lowered, verified against pK's eager model, timed at
compile time) -> a dispatch policy that follows the plan's batch-size ranges:

* plan range [lo, hi] -> plan path pK: within it, the fastest (compile-time measurement) verified
  ``pK-<target>``; the target choice uses ``dispatch.measured_ranges`` clipped to [lo, hi];
* when no ``pK-<target>`` verified (the rewrite exceeded its tolerance, or every lowering
  failed), the range falls back to the fastest verified path of any plan path, recorded in
  ``dispatch.fallbacks``;
* the plan's latency target (``max_batch_within_target``, designed by ``rewrite.cost.dispatch``)
  is copied: the runtime splits larger requests into chunks of that many rows.

Bad input (unknown pass or target, a plan for another model, an existing output) raises
RewriteError before any rewrite; nothing verified at all -> VerificationError, nothing written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rewrite.rewriting import Inputs, rewrite_checked
from rewrite.artifact import REFERENCE_FILE, file_entry, sha256_file, write_manifest
from rewrite.dispatch import plan_ranges
from rewrite.core.atomic import atomic_path
from rewrite.bundling import (DEFAULT_TARGETS, LATENCY_BATCH_SIZES, check_output, lower_path,
                              manifest_head, measure_latency, resolve_targets, verification_inputs)
from rewrite.cost.plan_file import check_plan_matches, plan_paths
from rewrite.core.errors import VerificationError
from rewrite.core.model_file import save
from rewrite.core.model import RecModel

REPORT_KEYS = ("verification_data", "samples", "within_tolerance", "max_abs_logit_diff",
               "mean_abs_logit_diff", "embedding_bytes_before", "embedding_bytes_after", "compression",
               "auc_before", "auc_after", "logloss_before", "logloss_after", "auc_gate", "failure")
TABLE_KEYS = ("table", "pass_name", "status", "after", "bytes_after", "max_abs_diff", "rel_error",
              "tolerance", "within_tolerance")


def rewrite_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The part of a ``rewrite_checked`` report kept in the manifest (JSON-safe)."""
    out = {k: report[k] for k in REPORT_KEYS if k in report}
    out["tables"] = [{k: t[k] for k in TABLE_KEYS} for t in report["tables"] if t["status"] == "rewritten"]
    return json.loads(json.dumps(out, default=float))


def resident_bytes(models: list[RecModel]) -> int:
    """Bytes the tables and MLPs of all ``models`` hold together, each distinct (table,
    representation) once: counted from the tensors of the models as stored."""
    distinct = {(t, rep.describe()): rep.num_bytes() for m in models for t, rep in m.embeddings.items()}
    return models[0].dense_bytes() + sum(distinct.values())


def compile_plan(model: RecModel, plan: dict[str, Any], plan_file: Path, out: Path, inputs: Inputs,
                 target_names: list[str] | None = None, source: Path | None = None, force: bool = False,
                 allow_degraded: bool = False, latency_sizes=LATENCY_BATCH_SIZES) -> dict[str, Any]:
    """Write the bundle of every plan path (module docstring) and return its manifest."""
    out = Path(out)
    targets = resolve_targets(list(target_names or DEFAULT_TARGETS))
    check_output(out, force)
    check_plan_matches(plan, model, str(plan_file))
    passes = plan_paths(plan)
    model = model.eval()
    torch.set_num_threads(1)
    variants: dict[str, dict[str, Any]] = {}
    models: dict[str, RecModel] = {}
    seen: dict[tuple[str, ...], str] = {}
    for name, configured in tqdm(passes.items(), desc="rewriting", unit="plan path", file=sys.stderr,
                                 leave=False):
        key = tuple(str(c) for c in configured)
        entry = {"passes": list(key), "plan_bytes": plan["paths"][name].get("bytes")}
        if key in seen:
            variants[name] = {**entry, "same_as": seen[key]}
            continue
        seen[key] = name
        recovering = bool(plan.get("recovery")) and name == plan.get("primary", "p0")
        # a recovered path is gated after recovery (by verify), as `rewrite apply --recover`
        rewritten, report = rewrite_checked(model, source or plan_file, configured, inputs,
                                            allow_degraded or recovering)
        if recovering and "failure" not in report:
            from rewrite.cost.recovered import recover_model

            rewritten = recover_model(model, rewritten, plan["recovery"])
            entry["recovered_on"] = plan["recovery"]["data"]
        entry["rewrite"] = rewrite_summary(report)
        entry["verified"] = "failure" not in report
        if entry["verified"]:
            models[name] = rewritten.eval()
            entry.update(embedding_bytes=rewritten.embedding_bytes(), dense_bytes=rewritten.dense_bytes())
        variants[name] = entry
    if not models:
        raise VerificationError(f"{plan_file}: no plan path passed verification; nothing written: "
                                + "; ".join(f"{n}: {v['rewrite']['failure']}" for n, v in variants.items()
                                            if "rewrite" in v))
    paths: dict[str, dict[str, Any]] = {}
    runners = {}
    with atomic_path(out, directory=True) as tmp:
        save(model, tmp / REFERENCE_FILE)
        for name, rewritten in models.items():
            rel = f"rewritten/{name}.safetensors"
            save(rewritten, tmp / rel)
            variants[name]["model"] = file_entry(tmp, rel)
            inputs_v = verification_inputs(rewritten)
            variants[name]["paths"] = []
            for target in tqdm(targets, desc=f"lowering {name}", unit="path", file=sys.stderr, leave=False):
                pname = f"{name}-{target.name}"
                paths[pname], runner = lower_path(target, rewritten, tmp, pname, rel, inputs_v)
                paths[pname]["plan_path"] = name
                variants[name]["paths"].append(pname)
                if runner is not None:
                    runners[pname] = runner
        latency = measure_latency(runners, model, latency_sizes) if runners else {}
        runners.clear()
        for name, per in latency.items():
            paths[name]["latency_ms"] = {str(b): ms for b, ms in per.items()}
        for entry in paths.values():
            entry["footprint_bytes"] = sum(f["bytes"] for f in entry["files"])
        served = {v: [n for n in e.get("paths", []) if n in latency] for v, e in variants.items()}
        for v, e in variants.items():                       # an alias serves what its twin serves
            if "same_as" in e:
                served[v] = served[e["same_as"]]
        if not any(served.values()):
            raise VerificationError(f"{out}: no path passed verification; nothing written: "
                                    + "; ".join(f"{n}: {p['verification']['failure']}" for n, p in paths.items()))
        constraints = plan.get("constraints", {})
        manifest = {
            **manifest_head(model, source, tmp),
            "paths": paths,
            "dispatch": {**plan_ranges(plan, served, latency),
                         "threads": 1, "measured": "compile time, one process, 1 thread"},
            "plan": {"file": str(plan_file), "sha256": sha256_file(plan_file), "primary": plan.get("primary", "p0"),
                     "hardware": plan.get("hardware", {}).get("name"), "target": plan.get("target"),
                     "memory_budget_bytes": constraints.get("memory_budget_bytes"),
                     "latency_target": constraints.get("latency_target"),
                     "resident_bytes": resident_bytes(list(models.values()))},
            "variants": variants,
        }
        write_manifest(tmp, manifest)
    return manifest


def warnings(manifest: dict[str, Any]) -> list[str]:
    """One line per plan path or bundle path that is not served as planned."""
    lines = [f"plan path {n}: not verified ({v['rewrite'].get('failure')})"
             for n, v in manifest.get("variants", {}).items() if v.get("verified") is False]
    lines += [f"path {n}: failed verification ({p['verification'].get('failure')})"
              for n, p in manifest["paths"].items() if not p["verification"]["passed"]]
    lines += [f"batches {f['min_batch']}..{f['max_batch'] or ''}: {f['reason']}"
              for f in manifest["dispatch"].get("fallbacks", [])]
    return lines
