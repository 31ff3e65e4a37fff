"""The two end-to-end flows, one function each, used by the CLI and exported as ``rewrite.compile``
and ``rewrite.plan``.

    manifest = rewrite.compile(model, "bundle/", passes=[passes.quantize(bits=8)], targets=["auto"])
    manifest = rewrite.compile("model.pt", "bundle/", plan="plan.json", data="day_1.npz")
    plan = rewrite.plan(model, "day_0.npz", memory_budget="64MB", max_auc_drop=0.001)

``compile``: model -> (passes, verified against the original | the plan's passes per plan path
| nothing) -> every target lowered, verified, timed -> one bundle with a dispatch policy, written
atomically.  Bad input (unknown pass or target, a plan for another model, an existing output
without ``force``) raises RewriteError before anything is rewritten; a rewrite beyond its
tolerance raises VerificationError (``.report`` holds the per-table report) and writes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from rewrite.core.errors import RewriteError, VerificationError
from rewrite.core.model import RecModel
from rewrite.core.pass_contract import ConfiguredPass, parse_pass

DEFAULT_TARGETS = ("auto",)      # every target usable here that accepts the model


def _model(model: RecModel | str | Path, overrides: dict[str, Any] | None = None) -> tuple[RecModel, Path | None]:
    if isinstance(model, RecModel):
        return model, None
    from rewrite.formats import load

    return load(Path(model), **(overrides or {})), Path(model)


def _passes(passes: Iterable[ConfiguredPass | str]) -> list[ConfiguredPass]:
    return [p if isinstance(p, ConfiguredPass) else parse_pass(p) for p in passes]


def compile(model: RecModel | str | Path, out: str | Path, *, passes: Iterable[ConfiguredPass | str] = (),  # noqa: A001
            plan: dict[str, Any] | str | Path | None = None, targets: Iterable[str] = DEFAULT_TARGETS,
            data: str | Path | None = None, profile: str | Path | None = None, samples: int = 8192,
            dense_transform: str = "log1p", allow_degraded: bool = False, force: bool = False,
            tune_trials: int | None = None, source: str | Path | None = None,
            load_overrides: dict[str, Any] | None = None, max_auc_drop: float | None = None) -> dict[str, Any]:
    """Write the bundle ``out`` and return its manifest (module docstring).  ``model``: a RecModel
    or a checkpoint path (read after every argument is checked, with ``load_overrides``, e.g.
    ``{"interaction": "dot"}``, for what a checkpoint cannot say); ``passes``: configured passes or ``-p`` strings; ``plan``: a plan/1 dict
    or file; ``data`` / ``profile``: the verification data and access profile of the passes (with
    a plan and neither given: the files the plan was fitted on, ``plan_inputs``, logged);
    ``max_auc_drop``: with ``passes``, the AUC they may lose on labelled ``data`` (default
    ``rewrite.rewriting.DEFAULT_MAX_AUC_DROP``; a plan carries its own)."""
    from rewrite.bundling import check_output, compile_model, resolve_targets, tune_options

    configured = _passes(passes)
    if configured and plan is not None:
        raise RewriteError("-p and --plan: give one or the other (a plan already names its passes)")
    if (data or profile or allow_degraded) and not (configured or plan is not None):
        raise RewriteError("--data, --profile and --allow-degraded need -p or --plan")
    if max_auc_drop is not None and not configured:
        raise RewriteError("--max-auc-drop needs -p (a plan carries its own, from `rewrite plan --max-auc-drop`)")
    names = list(targets)
    resolved = resolve_targets(names)                       # unknown / unavailable: fail first
    options = tune_options(resolved, tune_trials) if tune_trials else None
    if options and plan is not None:
        raise RewriteError("--tune with --plan is not supported yet: compile the plan, then tune a -p bundle")
    out = Path(out)
    check_output(out, force)
    plan_file = None
    if plan is not None:
        from rewrite.cost.plan_file import load_plan, plan_paths

        plan_file = Path(plan) if not isinstance(plan, dict) else Path(source or "plan")
        plan = load_plan(plan) if not isinstance(plan, dict) else plan
        plan_paths(plan)                                     # every pass spec parses: exit 2 first
        if data is None and profile is None:                 # the tables as the plan measured them
            from rewrite.cost.plan_file import plan_inputs

            data, profile, note = plan_inputs(plan)
            if note:
                logging.getLogger("rewrite").warning(note)
    model, path = _model(model, load_overrides)
    source = Path(source) if source else path
    if not (configured or plan is not None):
        return compile_model(model, out, names, source=source, force=force, target_options=options)

    from rewrite.plan_bundle import compile_plan, rewrite_summary
    from rewrite.rewriting import load_inputs, rewrite_checked

    inputs = load_inputs(model, Path(data) if data else None, Path(profile) if profile else None, samples,
                         dense_transform)
    if plan is not None:
        from rewrite.cost.plan_file import check_plan_matches

        check_plan_matches(plan, model, str(plan_file))
        return compile_plan(model, plan, plan_file, out, inputs, names, source=source, force=force,
                            allow_degraded=allow_degraded)
    from rewrite.rewriting import DEFAULT_MAX_AUC_DROP

    rewritten, report = rewrite_checked(model, source or Path("<model>"), configured, inputs, allow_degraded,
                                        DEFAULT_MAX_AUC_DROP if max_auc_drop is None else max_auc_drop)
    if "failure" in report:
        error = VerificationError(f"{report['failure']}; no bundle written")
        error.report = {**report, "output": str(out), "written": False}
        raise error
    return compile_model(rewritten, out, names, source=source, force=force, original=model,
                         extra={"passes": report["passes"], "rewrite": rewrite_summary(report)},
                         target_options=options)


def plan(model: RecModel | str | Path, data: str | Path, *, hardware: str = "cpu-local", target: str = "torch",
         memory_budget: str | int | None = None, max_auc_drop: float | None = None,
         max_rel_error: float | None = None, latency_target: str | None = None, batch: int = 512,
         samples: int = 16384, profile: str | Path | None = None, grid: str | Path | None = None,
         calibrate: bool = True, explain: bool = False, plot: str | Path | None = None,
         output: str | Path | None = None, recover: str | Path | None = None,
         recover_candidates: int = 3, recover_top: bool = False) -> dict[str, Any]:
    """Choose a representation per table and a path per batch size under the constraints; the
    plan/1 dict (``rewrite.cost.plan_file``), also written to ``output`` when given.
    ``recover``: measure the best few candidates after recovery on this data (``rewrite.cost.recovered``)."""
    from rewrite.cost.commands import run_plan

    model, path = _model(model)
    return run_plan(model, path or "<model>", Path(data), hardware, target,
                    None if memory_budget is None else str(memory_budget), max_auc_drop, max_rel_error,
                    latency_target, batch, samples, Path(profile) if profile else None,
                    Path(grid) if grid else None, calibrate, explain, Path(plot) if plot else None,
                    Path(output) if output else None, Path(recover) if recover else None,
                    recover_candidates, recover_top)
