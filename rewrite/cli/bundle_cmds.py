"""`rewrite compile`, `verify`, `bench` and `targets`: bundles on the command line."""

from __future__ import annotations

from pathlib import Path

import click

from rewrite.cli.group import emit, json_option, load_options, main, max_auc_drop_option
from rewrite.core.errors import RewriteError


@main.command("compile")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="bundle directory to write")
@click.option("--target", "target_names", multiple=True, metavar="NAME",
              help="a target to lower to (repeatable; default auto: every target usable here that "
                   "accepts the model, the others skipped with their reason; see `rewrite targets`)")
@click.option("-p", "--pass", "pass_specs", multiple=True, metavar="NAME[:key=value]...",
              help="apply this pass first, as `rewrite apply` does (repeat)")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path),
              help="a `rewrite plan -o` file: one rewritten model per plan path, dispatched per batch size")
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="with -p/--plan: verification batches (and the access profile when no --profile)")
@click.option("--profile", "profile_path", type=click.Path(path_type=Path),
              help="with -p/--plan: a saved `rewrite profile -o` file")
@click.option("--samples", default=8192, show_default=True, type=click.IntRange(min=1),
              help="verification samples drawn from --data")
@click.option("--dense-transform", default="log1p", show_default=True, type=click.Choice(["log1p", "none"]))
@max_auc_drop_option
@click.option("--allow-degraded", is_flag=True,
              help="compile even if a rewritten table exceeds its tolerance or the AUC gate fails")
@click.option("--force", is_flag=True, help="replace an existing bundle")
@click.option("--tune", "tune_trials", type=click.IntRange(min=1), metavar="N",
              help="meta-schedule N trials per tuned batch size (tvm-llvm; off by default)")
@load_options
@json_option
def compile_cmd(path, output, target_names, pass_specs, plan_path, data_path, profile_path, samples,
                dense_transform, max_auc_drop, allow_degraded, force, tune_trials, interaction, qr_op, as_json) -> None:
    """Lower a checkpoint (after -p passes or a --plan) to a verified bundle with a dispatch policy."""
    from rewrite.api import DEFAULT_TARGETS, compile
    from rewrite.core.errors import VerificationError
    from rewrite.core.pass_contract import parse_pass

    configured = [parse_pass(s) for s in pass_specs]         # a bad spec: exit 2 before loading
    if plan_path and data_path is None and profile_path is None:
        from rewrite.cost.plan_file import load_plan, plan_inputs

        data_path, profile_path, note = plan_inputs(load_plan(plan_path))
        if note:
            click.echo(("note: " if data_path else "warning: ") + note, err=True)
    overrides = {k: v for k, v in (("interaction", interaction), ("qr_op", qr_op)) if v}
    try:
        manifest = compile(path, output, passes=configured, load_overrides=overrides,
                           plan=plan_path, targets=list(target_names) or DEFAULT_TARGETS, data=data_path,
                           profile=profile_path, samples=samples, dense_transform=dense_transform,
                           allow_degraded=allow_degraded, force=force, tune_trials=tune_trials, source=path,
                           max_auc_drop=max_auc_drop)
    except VerificationError as e:
        if getattr(e, "report", None):
            from rewrite.rewriting import summary

            emit(e.report, as_json, summary)
        raise
    if plan_path:
        from rewrite.plan_bundle import warnings

        for line in warnings(manifest):
            click.echo(f"warning: {line}", err=True)
    _emit_compiled(output, manifest, as_json)


def _emit_compiled(output: Path, manifest: dict, as_json: bool) -> None:
    result = {"bundle": str(output), "paths": {n: {"latency_ms": p.get("latency_ms"),
                                                   "verification": p["verification"],
                                                   "mlp_plan": p.get("options", {}).get("mlp_plan")}
                                               for n, p in manifest["paths"].items()},
              "skipped_targets": manifest.get("skipped_targets", {}),
              "dispatch": manifest["dispatch"]}
    if "rewrite" in manifest:                   # -p: the apply gate's result
        result["rewrite"] = manifest["rewrite"]
    emit(result, as_json, _human_paths)


def _human_paths(d) -> str:
    lines = [f"{d['bundle']}:"]
    if d.get("rewrite", {}).get("auc_gate"):
        from rewrite.rewriting import gate_line

        lines.append("  " + gate_line(d["rewrite"]["auc_gate"]))
    for name, p in d["paths"].items():
        v = p["verification"]
        status = "ok" if v["passed"] else "FAILED"
        lat = ", ".join(f"B={b} {ms:.3f} ms" for b, ms in (p.get("latency_ms") or {}).items())
        err = v["failure"] if "failure" in v else f"max |dp| {v['max_abs_prob_error']:.2e} (tol {v['tolerance']:g})"
        auc = f", AUC {v['auc']:.5f} vs {v['reference_auc']:.5f}" if "auc" in v else ""
        lines.append(f"  {name:<16} {status:<7} {err}{auc}  {lat}")
        if p.get("mlp_plan"):
            from targets.native.mlp_plan import describe_plan

            lines.append(f"  {'':<16} {describe_plan(p['mlp_plan'])}")
    for name, why in d.get("skipped_targets", {}).items():
        lines.append(f"  {name:<16} skipped {why}")
    if "dispatch" in d:
        from rewrite.dispatch import batch_range

        lines.append("  dispatch: " + ", ".join(f"{batch_range(r['min_batch'], r['max_batch'])} -> {r['path']}"
                                                for r in d["dispatch"]["ranges"]))
    return "\n".join(lines)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(path_type=Path), help="dlrm .npz to compare on as well")
@click.option("--limit", default=16384, show_default=True, type=int, help="samples of --data used")
@json_option
def verify(bundle, data_path, limit, as_json) -> None:
    """Check every path of a bundle against torch eager of the model it was lowered from."""
    from rewrite import data
    from rewrite.artifact import open_bundle
    from rewrite.core.errors import VerificationError
    from rewrite.core.model_file import load
    from rewrite.runtime import Predictor
    from rewrite.verification import compare, data_checks, reference_logits, synthetic_checks
    from targets.base import TOLERANCE

    b = open_bundle(bundle)
    pred = Predictor(b, threads=1)
    extra = []
    if data_path:
        ds = data.open(data_path)
        data.check_matches(ds, b.n_dense, b.n_features)
        extra = data_checks(ds, limit=limit)
    results, references = {}, {}
    for name, entry in b.paths.items():
        if not entry["verification"]["passed"]:
            results[name] = entry["verification"]
            continue
        ref_file = b.reference_file(name)
        if ref_file not in references:
            model = load(ref_file)
            checks = synthetic_checks(model, seed=1000) + extra
            references[ref_file] = checks, reference_logits(model, checks)
        checks, expected = references[ref_file]
        results[name] = compare(pred.runner(name), checks, expected, b.n_features, TOLERANCE[entry["precision"]])
    failed = [n for n, v in results.items() if not v["passed"]]
    emit({"bundle": str(bundle), "paths": {n: {"verification": v} for n, v in results.items()}},
         as_json, _human_paths)
    if failed:
        raise VerificationError(f"{bundle}: {len(failed)} path(s) failed: {', '.join(failed)}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,64,512,2048", show_default=True, help="comma-separated")
@click.option("--reference", type=click.Path(path_type=Path),
              help="baseline checkpoint (default: the bundle's reference model)")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="intra-op threads")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1), help="alternating rounds")
@click.option("--lookups-per-bag", "pooling", default=1, show_default=True, type=click.IntRange(1))
@click.option("--hardware", "hw_name", default="cpu-local", show_default=True,
              help="the spec each figure's host limit comes from: cpu-local (this machine, measured "
                   "once and cached), a preset, a JSON spec, or none")
@json_option
def bench(bundle, batch_sizes, reference, threads, rounds, pooling, hw_name, as_json) -> None:
    """Throughput and p50/p99 latency of every path vs torch eager fp32, in one run, and each
    figure as a share of this host's limit."""
    from rewrite.bench import human, run_bench
    from rewrite.cost.hardware import load_hardware

    try:
        sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise RewriteError(f"--batch-sizes: expected comma-separated integers, got {batch_sizes!r}") from None
    hardware = None if hw_name == "none" else load_hardware(hw_name, threads=threads)
    result = run_bench(bundle, sizes, reference, threads, rounds, pooling, hardware=hardware)
    emit(result, as_json, human)


@main.command("targets")
@json_option
def targets_cmd(as_json) -> None:
    """Which targets run on this machine, and why the others do not."""
    from rewrite.core import isa
    from targets.base import TARGETS, get_target

    get_target("torch")
    result = {"host": isa.describe(), "targets": [{"name": n, "devices": list(c.devices), "precision": c.precision,
                           "summary": c.summary, "available": c().unavailable() is None,
                           "why_not": c().unavailable()} for n, c in sorted(TARGETS.items())]}

    def human(d):
        host = d["host"]
        head = f"host: {host['cpu']} ({host['arch']}), ISA tier {host['tier']} (highest here: {host['host_tier']})"
        return "\n".join([head] + [f"  {t['name']:<17}{'yes' if t['available'] else 'no':<5}"
                                    f"{t['summary'] if t['available'] else t['why_not']}" for t in d["targets"]])

    emit(result, as_json, human)
