"""``rewrite apply``: passes from ``-p`` specs, data and profile from files, verify, write.

Order matters for the exit codes: every pass spec is parsed and the output path checked before
the model is loaded (bad input -> RewriteError, exit 2, nothing written); a table beyond its
tolerance leaves nothing written unless ``allow_degraded`` (the CLI then exits 1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rewrite import data
from rewrite.core.atomic import check_new_output
from rewrite.core.batch import Batch
from rewrite.core.errors import RewriteError, VerificationError
from rewrite.distributed import SINGLE, Group
from rewrite.inspection import human_bytes
from rewrite.core.model import RecModel
from rewrite.core.pass_contract import ConfiguredPass, parse_pass
from rewrite.core.result_file import ResultFile
from rewrite.pass_manager import apply, require_within_tolerance
from rewrite.core.access_profile import AccessProfile
from rewrite.profiling import profile

SAMPLE_BATCH = 2048   # rows per verification batch
DEFAULT_MAX_AUC_DROP = 0.005   # apply / compile -p: the AUC a rewrite may lose on labelled --data.  Both
                               # AUCs come from the same samples, so the drop is far less noisy than either;
                               # 0.005 passes int8/int4, md 0.8, qr c=4 on the demo and stops issue 22's
                               # -p tt (0.7168 -> 0.6811)


def sample_batches(ds: data.Dataset, n: int, seed: int = 0) -> list[Batch]:
    """``n`` rows of ``ds`` drawn without replacement (all of them if fewer), in batches."""
    rows = np.arange(ds.n_samples)
    if n < ds.n_samples:
        rows = np.sort(np.random.default_rng(seed).choice(ds.n_samples, n, replace=False))
    return [ds.batch(rows[lo:lo + SAMPLE_BATCH]) for lo in range(0, len(rows), SAMPLE_BATCH)]


@dataclass
class Inputs:
    """What the passes are fitted and verified on: data (optional), access profile, sample."""

    data_path: Path | None
    dataset: data.Dataset | None
    profile: AccessProfile | None
    sample: list[Batch] | None


def load_inputs(model: RecModel, data_path: Path | None, profile_path: Path | None, samples: int,
                dense_transform: str, group: Group = SINGLE) -> Inputs:
    """Open ``--data`` (checked against the model) and ``--profile`` (default: profile the data,
    each rank its share of it)."""
    ds = None
    if data_path is not None:
        ds = data.open(data_path, dense_transform)
        data.check_matches(ds, model.spec.n_dense, len(model.spec.features))
    if profile_path is not None:
        prof = AccessProfile.load(profile_path, model)
    else:
        prof = profile(model, ds, group=group) if ds is not None else None
    return Inputs(data_path, ds, prof, sample_batches(ds, samples) if ds is not None else None)


def auc_gate(result: dict[str, Any], max_auc_drop: float | None, data_path: Path | None,
             allowed_by: str | None) -> dict[str, Any]:
    """The ``--max-auc-drop`` gate on a rewrite report: ``status`` passed | failed | allowed (failed,
    kept by ``allowed_by``) | not measured (no labelled data: only the per-table tolerances and the
    logit differences judge the rewrite) | off (``max_auc_drop`` None)."""
    gate: dict[str, Any] = {"max_auc_drop": max_auc_drop, "auc_drop": None}
    if max_auc_drop is None:
        return {**gate, "status": "off"}
    if "auc_before" not in result:
        why = (f"{data_path} has no labels" if data_path is not None
               else "no --data (verified on random batches)")
        return {**gate, "status": "not measured", "note": f"{why}: AUC not measured, the gate does not apply"}
    before, after = result["auc_before"], result["auc_after"]
    drop = before - after
    gate["auc_drop"] = drop
    if not np.isfinite(drop):                     # one class only in the sample
        return {**gate, "status": "not measured", "note": f"{data_path}: labels of one class only"}
    if drop <= max_auc_drop:
        return {**gate, "status": "passed"}
    note = (f"AUC {before:.4f} -> {after:.4f} on {data_path}: a drop of {drop:.4f} exceeds "
            f"--max-auc-drop {max_auc_drop:g}")
    return {**gate, "status": "allowed" if allowed_by else "failed",
            "note": note + (f" (kept: {allowed_by})" if allowed_by else "; use --allow-degraded to keep it anyway")}


def rewrite_checked(model: RecModel, source: Path, configured: list[ConfiguredPass], inputs: Inputs,
                    allow_degraded: bool, max_auc_drop: float | None = None,
                    allowed_by: str = "--allow-degraded", group: Group = SINGLE,
                    output: ResultFile | None = None) -> tuple[RecModel, dict[str, Any]]:
    """Apply the passes and verify; the report as JSON, with ``failure`` when a table exceeds its
    tolerance or the AUC drops by more than ``max_auc_drop`` on labelled data (unless
    ``allow_degraded``, which ``allowed_by`` names in the report): the caller then writes nothing.
    ``group``: the ranks fitting the tables, ``output`` the file tables spilled out of memory go to
    (``pass_manager.apply``)."""
    rewritten, report = apply(model, configured, profile=inputs.profile, sample=inputs.sample, group=group,
                              output=output)
    result = {"model": str(source), "passes": [str(p) for p in configured],
              "profile": None if inputs.profile is None else inputs.profile.source,
              "verification_data": str(inputs.data_path) if inputs.dataset is not None
              else "random ragged batches", **report.to_json()}
    result["auc_gate"] = auc_gate(result, max_auc_drop, inputs.data_path,
                                  allowed_by if allow_degraded else None)
    failures = []
    try:
        if not allow_degraded:
            require_within_tolerance(report)
    except VerificationError as e:
        failures.append(str(e))
    if result["auc_gate"]["status"] == "failed":
        failures.append(result["auc_gate"]["note"])
    if failures:
        result["failure"] = "; ".join(failures)
    return rewritten, result


def check_output(output: Path, force: bool) -> Path:
    """``-o``: a file path, new unless ``force`` (RewriteError otherwise)."""
    output = Path(output)
    if output.is_dir():
        raise RewriteError(f"{output}: is a directory; -o takes the path of the file to write")
    check_new_output(output, force)
    return output


def run_apply(path: Path, specs: list[str], data_path: Path | None, profile_path: Path | None,
              samples: int, dense_transform: str, allow_degraded: bool, output: Path,
              load_model: Callable[[Path], RecModel],
              recovery: dict[str, Any] | None = None, max_auc_drop: float | None = DEFAULT_MAX_AUC_DROP,
              force: bool = False, group: Group = SINGLE) -> dict[str, Any]:
    """Run the passes; return the report as JSON, with ``written`` and, when not, ``failure``.

    ``recovery``: the ``--recover`` options (``rewrite.recovery.run_recovery_from_cli``'s keyword
    arguments).  With ``--recover DATA`` the per-table tolerance is reported but does not gate:
    distillation exists to repair rewrites that miss it, and it moves tables away from the fitted
    ones on purpose; its own report (AUC / log loss on ``--eval``) is the result to judge.  The same
    holds for the ``max_auc_drop`` gate, measured before recovery.  An existing ``output`` is
    refused (exit 2) unless ``force``.

    ``group``: on N ranks (``rewrite.distributed``) every rank runs this with the same arguments;
    the tables are fitted across the ranks, recovery trains data-parallel, and only rank 0 writes,
    after every rank has finished without error (``Group.agree``)."""
    configured = [parse_pass(s) for s in specs]
    output = check_output(output, force)
    model = load_model(Path(path))
    recovering = recovery is not None and recovery.get("recover_path") is not None
    inputs = load_inputs(model, data_path, profile_path, samples, dense_transform, group)
    # the tables spilled out of memory go straight into the output (rank 0's): each is written once
    result_file = ResultFile(output) if group.writes else None
    with result_file or contextlib.nullcontext():
        rewritten, result = rewrite_checked(model, path, configured, inputs, allow_degraded or recovering,
                                            max_auc_drop, "--allow-degraded" if allow_degraded else "--recover",
                                            group, result_file)
        result.update(output=str(output), written=False)
        if "failure" in result:
            return result
        if recovery is not None:
            from rewrite.recovery import run_recovery_from_cli

            rewritten, result["recovery"] = run_recovery_from_cli(model, rewritten, dense_transform=dense_transform,
                                                                  **recovery, ranks=group)
        group.agree()         # every rank finished: only now may rank 0 write
        if not group.writes:
            return result
        result_file.finish(rewritten)
    result["written"] = True
    return result


def apply_rank(group: Group, path: Path, specs: list[str], interaction: str | None, qr_op: str | None,
               options: dict[str, Any]) -> dict[str, Any]:
    """``run_apply`` on one rank of ``rewrite apply --nproc N`` / torchrun (picklable for spawn)."""
    from rewrite.formats import load

    overrides = {k: v for k, v in (("interaction", interaction), ("qr_op", qr_op)) if v}
    return run_apply(path, specs, load_model=lambda p: load(p, **overrides), group=group, **options)


def gate_line(gate: dict[str, Any]) -> str:
    """One line saying what the AUC gate found."""
    limit = gate["max_auc_drop"]
    if gate["status"] == "off":
        return "AUC gate: off"
    if gate["status"] == "passed":
        return f"AUC gate: passed (drop {gate['auc_drop']:+.4f} <= --max-auc-drop {limit:g})"
    return f"AUC gate (--max-auc-drop {limit:g}): {gate['status'].upper()}: {gate['note']}"


def summary(d: dict[str, Any]) -> str:
    """The human form of ``run_apply``'s result."""
    lines = [f"{d['model']}: {' '.join('-p ' + p for p in d['passes'])}"]
    for t in d["tables"]:
        head = f"  {t['table']:<8}{t['pass_name']:<10}"
        if t["status"] == "skipped":
            lines.append(f"{head}skipped: {t['reason']}")
            continue
        verdict = "ok" if t["within_tolerance"] else "EXCEEDED"
        lines.append(f"{head}{t['after']}  {human_bytes(t['bytes_before'])} -> {human_bytes(t['bytes_after'])}"
                     f"  max |Δ| {t['max_abs_diff']:.3g}, rel {t['rel_error']:.3g}  [{t['tolerance']}: {verdict}]")
    if not d.get("tables_rewritten", 1):
        lines.append("no table rewritten: every selected table was skipped (reasons above); the model is unchanged")
    lines.append(f"embeddings {human_bytes(d['embedding_bytes_before'])} -> "
                 f"{human_bytes(d['embedding_bytes_after'])} ({d['compression']:.2f}x smaller)")
    lines.append(f"verification on {d['samples']:,} samples ({d['verification_data']}): "
                 f"max |Δ logit| {d['max_abs_logit_diff']:.4g}, mean {d['mean_abs_logit_diff']:.4g}")
    gate = d.get("auc_gate")
    if gate:
        lines.append(gate_line(gate))
    if "auc_before" in d:
        lines.append(f"AUC {d['auc_before']:.4f} -> {d['auc_after']:.4f} ({d['auc_after'] - d['auc_before']:+.4f}), "
                     f"logloss {d['logloss_before']:.4f} -> {d['logloss_after']:.4f} "
                     f"({d['logloss_after'] - d['logloss_before']:+.4f})")
    rec = d.get("recovery")
    if rec and rec.get("skipped"):
        lines.append(f"recovery on {rec['data']}: skipped: {rec['skipped']}")
    elif rec:
        lines.append(f"recovery on {rec['data']}: {rec['steps']} steps in {rec['seconds']:.0f} s "
                     f"(kept step {rec['best_step']}), held-out loss {rec['holdout_loss_before']:.4g} -> "
                     f"{rec['holdout_loss_after']:.4g}")
        if rec.get("eval"):
            lines.append(f"  on {rec['eval_data']}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec["eval"].items()))
    lines.append(f"written to {d['output']}" if d["written"] else "nothing written")
    return "\n".join(lines)
