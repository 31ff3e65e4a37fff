"""The ``rewrite`` command.

Exit codes: 0 success, 1 a verification failed, 2 bad input.  Results go to stdout (one JSON
object with ``--json``); progress bars and logs go to stderr.  ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from rewrite.errors import RewriteError
from rewrite.recovery import add_recovery_options


class _Group(click.Group):
    """Turns toolkit errors into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RewriteError as e:
            if ctx.meta.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except (KeyboardInterrupt, BrokenPipeError):
            ctx.exit(130)


def emit(result: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    click.echo(json.dumps(result, indent=1, default=str) if as_json else human(result))


json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks instead of one-line errors")
@click.version_option(package_name="dlrm-rewrite")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Rewrite a trained DLRM's embedding tables, compile the result, pick a path."""
    ctx.meta["debug"] = debug


def load_options(f):
    f = click.option("--interaction", type=click.Choice(["dot", "dot-self", "cat"]),
                     help="dlrm files: the interaction, where layer widths cannot tell")(f)
    f = click.option("--qr-op", type=click.Choice(["mult", "add", "concat"]),
                     help="dlrm files: --qr-operation used in training (not stored in the file)")(f)
    return f


def load_model(path: Path, interaction: str | None, qr_op: str | None):
    from rewrite.formats import load

    overrides = {k: v for k, v in (("interaction", interaction), ("qr_op", qr_op)) if v}
    return load(path, **overrides)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@load_options
@json_option
def inspect(path: Path, interaction, qr_op, as_json: bool) -> None:
    """What a checkpoint or a bundle holds: tables, representations, bytes, MLPs (and paths)."""
    from rewrite.inspection import describe_bundle, describe_model, human_bytes

    from rewrite.formats import dcp

    if path.is_dir() and not dcp.is_dcp(path):     # a bundle (a DCP directory is a checkpoint)
        from rewrite.artifact import open_bundle

        info = describe_bundle(open_bundle(path))
    else:
        info = describe_model(load_model(path, interaction, qr_op), path)

    def human(d):
        lines = [f"{d['path']}  ({d['format']})",
                 f"  dense {d['n_dense']} -> bottom {d['bottom_mlp'][1:]}  "
                 f"interaction {d['interaction']}"
                 + (f" ({d['cross_layers']} cross layers, rank {d['cross_rank']})"
                    if d['interaction'] == "dcn" else "") + f"  top {d['top_mlp']}",
                 f"  {len(d['tables'])} tables, embeddings {human_bytes(d['embedding_bytes'])}, "
                 f"MLPs {human_bytes(d['dense_bytes'])}",
                 f"  {'table':<10}{'rows':>12}{'dim':>6}  {'bytes':>12}  representation"]
        for t in d["tables"]:
            lines.append(f"  {t['name']:<10}{t['rows']:>12,}{t['dim']:>6}  {human_bytes(t['bytes']):>12}"
                         f"  {t['describe']}")
        meta = d["provenance"].get("metadata")
        if meta:
            lines.append("  training metadata: " + ", ".join(f"{k}={v}" for k, v in meta.items()))
        for name, p in d.get("paths", {}).items():
            lat = ", ".join(f"B={b}: {ms:.3f} ms" for b, ms in (p["latency_ms"] or {}).items())
            lines.append(f"  path {name:<14} {p['precision']:<11} {'verified' if p['verified'] else 'FAILED':<9}"
                         f" files {human_bytes(p['footprint_bytes']):>10}  {lat}"
                         + ("  (default)" if name == d["default_path"] else ""))
        return "\n".join(lines)

    emit(info, as_json, human)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="dlrm .npz (X_int, X_cat[, y]), TorchRec <prefix>_{dense,sparse,labels}.npy, "
                   "or Criteo TSV (optionally gzipped)")
@click.option("--sample-rate", default=1.0, show_default=True, type=float,
              help="fraction of samples counted (FAE samples ~5%)")
@click.option("--coverage", default=0.9, show_default=True, type=float,
              help="report the hot set covering this share of lookups")
@click.option("--hot-bytes", default=None, type=str, help="report the hot rows fitting this budget, e.g. 64MB")
@click.option("--dense-transform", type=click.Choice(["log1p", "log3", "none"]),
              help="dlrm log(max(x,0)+1), TorchRec log(x+3), or as stored [default: the model's]")
@click.option("--hash-mode", type=click.Choice(["mod", "torchrec", "none"]),
              help="categorical value -> row: v mod rows, TorchRec's int32(v) mod rows, or as stored "
                   "[default: none for .npz, else mod]")
@click.option("--skip-bad-rows", is_flag=True, help="TSV: count and skip rows that do not parse")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="write the profile JSON here")
@load_options
@json_option
def profile(path, data_path, sample_rate, coverage, hot_bytes, dense_transform, hash_mode,
            skip_bad_rows, output, interaction, qr_op, as_json) -> None:
    """Per-table access statistics (FAE-style) on a sample of the data."""
    from rewrite import data
    from rewrite.inspection import human_bytes
    from rewrite.profiling import profile as run_profile
    from rewrite.units import parse_bytes

    if not 0 < coverage <= 1:
        raise RewriteError(f"--coverage must be in (0, 1], got {coverage}")
    budget = parse_bytes(hot_bytes) if hot_bytes else None
    model = load_model(path, interaction, qr_op)
    ds = data.open(data_path, dense_transform, model=model, hash_mode=hash_mode,
                   skip_bad_rows=skip_bad_rows)
    prof = run_profile(model, ds, sample_rate)
    if output:
        prof.save(output, coverage, budget)
    result = prof.to_json(coverage, budget)
    result.pop("counts")
    result["skipped_bad_rows"] = ds.skipped_rows

    def human(d):
        skipped = f", {d['skipped_bad_rows']:,} bad rows skipped" if d["skipped_bad_rows"] else ""
        lines = [f"{d['samples']:,} samples from {d['source']} (rate {d['sample_rate']}{skipped})",
                 f"  {'table':<8}{'rows':>10}{'touched':>10}{'top1%':>8}{'top10%':>8}{'zipf':>7}"
                 f"{'hot@' + format(coverage, '.0%'):>10}"
                 + (f"{'in ' + human_bytes(budget):>14}{'covers':>8}" if budget else "")]
        for t in d["tables"]:
            line = (f"  {t['name']:<8}{t['rows']:>10,}{t['touched_rows']:>10,}"
                    f"{t['top_1pct_coverage']:>8.1%}{t['top_10pct_coverage']:>8.1%}"
                    f"{t['zipf_exponent']:>7.2f}{t['hot_rows_for_coverage']:>10,}")
            if budget:
                line += f"{t['hot_rows_in_budget']:>14,}{t['hot_budget_coverage']:>8.1%}"
            lines.append(line)
        if output:
            lines.append(f"profile written to {output}")
        return "\n".join(lines)

    emit(result, as_json, human)


@main.command("apply")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-p", "--pass", "pass_specs", multiple=True, required=True, metavar="NAME[:key=value]...",
              help="a pass and its options, e.g. -p quantize:bits=4 (repeat; `rewrite passes` lists them)")
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="dlrm-processed .npz: verification batches (AUC/logloss with labels), and the "
                   "access profile when no --profile")
@click.option("--profile", "profile_path", type=click.Path(path_type=Path),
              help="a saved `rewrite profile -o` file: fitting weights")
@click.option("--samples", default=8192, show_default=True, type=click.IntRange(min=1),
              help="verification samples drawn from --data")
@click.option("--dense-transform", default="log1p", show_default=True, type=click.Choice(["log1p", "none"]))
@click.option("--allow-degraded", is_flag=True, help="write the model even if a table exceeds its tolerance")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="the rewritten model (native safetensors), written atomically")
@add_recovery_options
@load_options
@json_option
def apply_command(path, pass_specs, data_path, profile_path, samples, dense_transform, allow_degraded,
                  output, interaction, qr_op, as_json, **recovery) -> None:
    """Rewrite tables with passes, verify against the original, optionally recover by
    distillation (--recover DATA), write one file."""
    from rewrite.applying import run_apply, summary

    result = run_apply(path, pass_specs, data_path, profile_path, samples, dense_transform,
                       allow_degraded, output, load_model=lambda p: load_model(p, interaction, qr_op),
                       recovery=recovery)
    emit(result, as_json, summary)
    if not result["written"]:
        from rewrite.errors import VerificationError

        raise VerificationError(result["failure"])


@main.command("passes")
@json_option
def passes_command(as_json: bool) -> None:
    """Every pass, its options (type, default) and which tables its defaults touch."""
    from rewrite.passinfra import PASSES, get_pass, option_rows

    get_pass("onehot")   # imports and registers every pass
    result = {"passes": [{"name": name, "summary": info.summary, "defaults_touch": info.config().touches(),
                          "options": [{"name": n, "type": t, "default": d, "help": h}
                                      for n, t, d, h in option_rows(info)]}
                         for name, info in sorted(PASSES.items())]}

    def human(d):
        lines = []
        for p in d["passes"]:
            lines += [f"{p['name']}: {p['summary']}", f"  defaults touch: {p['defaults_touch']}"]
            for o in p["options"]:
                lines.append(f"  {o['name']:<11}{o['type']:<22}{o['default'] or '(all)':<8}  {o['help']}")
            lines.append("")
        return "\n".join(lines).rstrip()

    emit(result, as_json, human)


@main.command("compile")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="bundle directory to write")
@click.option("--target", "target_names", multiple=True, metavar="NAME",
              help="a target to lower to (repeatable; default onnx-cpu; see `rewrite targets`)")
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
@click.option("--allow-degraded", is_flag=True, help="compile even if a rewritten table exceeds its tolerance")
@click.option("--force", is_flag=True, help="replace an existing bundle")
@click.option("--tune", "tune_trials", type=click.IntRange(min=1), metavar="N",
              help="meta-schedule N trials per tuned batch size (tvm-llvm; off by default)")
@load_options
@json_option
def compile_cmd(path, output, target_names, pass_specs, plan_path, data_path, profile_path, samples,
                dense_transform, allow_degraded, force, tune_trials, interaction, qr_op, as_json) -> None:
    """Lower a checkpoint (after -p passes or a --plan) to a verified bundle with a dispatch policy."""
    from rewrite.compiler import check_output, compile_model, resolve_targets, tune_options
    from rewrite.errors import VerificationError

    if pass_specs and plan_path:
        raise RewriteError("-p and --plan: give one or the other (a plan already names its passes)")
    if (data_path or profile_path or allow_degraded) and not (pass_specs or plan_path):
        raise RewriteError("--data, --profile and --allow-degraded need -p or --plan")
    targets = resolve_targets(list(target_names) or ["onnx-cpu"])   # unknown / unavailable: fail first
    options = tune_options(targets, tune_trials) if tune_trials else None
    if options and plan_path:
        raise RewriteError("--tune with --plan is not supported yet: compile the plan, then tune a -p bundle")
    check_output(output, force)
    names = list(target_names) or None
    if not (pass_specs or plan_path):
        model = load_model(path, interaction, qr_op)
        manifest = compile_model(model, output, names, source=path, force=force, target_options=options)
        return _emit_compiled(output, manifest, as_json)
    from rewrite.applying import load_inputs, rewrite_checked, summary
    from rewrite.compilation import compile_plan, rewrite_summary, warnings
    from rewrite.passinfra import parse_pass

    if plan_path:
        from rewrite.cost.plan import check_plan_matches, load_plan, plan_paths

        plan = load_plan(plan_path)
        plan_paths(plan)                                     # every pass spec parses: exit 2 first
        model = load_model(path, interaction, qr_op)
        check_plan_matches(plan, model, str(plan_path))
        inputs = load_inputs(model, data_path, profile_path, samples, dense_transform)
        manifest = compile_plan(model, plan, plan_path, output, inputs, names, source=path, force=force,
                                allow_degraded=allow_degraded)
        for line in warnings(manifest):
            click.echo(f"warning: {line}", err=True)
        return _emit_compiled(output, manifest, as_json)
    configured = [parse_pass(s) for s in pass_specs]
    model = load_model(path, interaction, qr_op)
    inputs = load_inputs(model, data_path, profile_path, samples, dense_transform)
    rewritten, report = rewrite_checked(model, path, configured, inputs, allow_degraded)
    if "failure" in report:
        emit({**report, "output": str(output), "written": False}, as_json, summary)
        raise VerificationError(f"{report['failure']}; no bundle written")
    manifest = compile_model(rewritten, output, names, source=path, force=force, original=model,
                             extra={"passes": report["passes"], "rewrite": rewrite_summary(report)},
                             target_options=options)
    _emit_compiled(output, manifest, as_json)


def _emit_compiled(output: Path, manifest: dict, as_json: bool) -> None:
    emit({"bundle": str(output), "paths": {n: {"latency_ms": p.get("latency_ms"),
                                               "verification": p["verification"]}
                                           for n, p in manifest["paths"].items()},
          "dispatch": manifest["dispatch"]}, as_json, _human_paths)


def _human_paths(d) -> str:
    lines = [f"{d['bundle']}:"]
    for name, p in d["paths"].items():
        v = p["verification"]
        status = "ok" if v["passed"] else "FAILED"
        lat = ", ".join(f"B={b} {ms:.3f} ms" for b, ms in (p.get("latency_ms") or {}).items())
        err = v["failure"] if "failure" in v else f"max |dp| {v['max_abs_prob_error']:.2e} (tol {v['tolerance']:g})"
        auc = f", AUC {v['auc']:.5f} vs {v['reference_auc']:.5f}" if "auc" in v else ""
        lines.append(f"  {name:<14} {status:<7} {err}{auc}  {lat}")
    if "dispatch" in d:
        lines.append("  dispatch: " + ", ".join(f"{r['min_batch']}..{r['max_batch'] or ''} -> {r['path']}"
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
    from rewrite.errors import VerificationError
    from rewrite.formats.native import load
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
@json_option
def bench(bundle, batch_sizes, reference, threads, rounds, pooling, as_json) -> None:
    """Throughput and p50/p99 latency of every path vs torch eager fp32, in one run."""
    from rewrite.bench import run_bench

    try:
        sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise RewriteError(f"--batch-sizes: expected comma-separated integers, got {batch_sizes!r}") from None
    result = run_bench(bundle, sizes, reference, threads, rounds, pooling)

    def human(d):
        lines = [f"{d['bundle']}: {d['threads']} thread(s), {d['rounds']} rounds, baseline {d['baseline']}",
                 f"  {'path':<18}{'batch':>6}{'samples/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'vs eager':>9}"]
        for r in d["results"]:
            lines.append(f"  {r['path']:<18}{r['batch']:>6}{r['samples_per_s']:>12,.0f}{r['p50_ms']:>9.3f}"
                         f"{r['p99_ms']:>9.3f}{r['speedup']:>8.2f}x")
        lines += [f"  {name}: absent ({why})" for name, why in d["absent"].items()]
        return "\n".join(lines)

    emit(result, as_json, human)




@main.command("targets")
@json_option
def targets_cmd(as_json) -> None:
    """Which targets run on this machine, and why the others do not."""
    from targets.base import TARGETS, get_target

    get_target("torch")
    result = {"targets": [{"name": n, "devices": list(c.devices), "precision": c.precision,
                           "summary": c.summary, "available": c().unavailable() is None,
                           "why_not": c().unavailable()} for n, c in sorted(TARGETS.items())]}

    def human(d):
        return "\n".join(f"  {t['name']:<15}{'yes' if t['available'] else 'no':<5}"
                         f"{t['summary'] if t['available'] else t['why_not']}" for t in d["targets"])

    emit(result, as_json, human)



@main.command()
@click.option("--hardware", "name", default="cpu-local", show_default=True,
              help="cpu-local (this machine, measured), a preset, or a JSON spec file")
@click.option("--refresh", is_flag=True, help="re-measure cpu-local instead of using the cache")
@click.option("--calibrate", "target", type=click.Choice(["torch", "onnx-cpu"]),
              help="cpu-local: time a few configurations on this target and fit the latency model")
@click.option("--presets", is_flag=True, help="list the presets")
@json_option
def hardware(name, refresh, target, presets, as_json) -> None:
    """A hardware spec as the cost model sees it (cpu-local is measured, then cached)."""
    from rewrite.cost.commands import hardware_report, human_hardware

    emit(hardware_report(name, refresh, target, presets), as_json, human_hardware)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="sample .npz (X_int, X_cat[, y]): quality, pooling and access profile")
@click.option("--hardware", "hw_name", default="cpu-local", show_default=True,
              help="cpu-local, a preset (`rewrite hardware --presets`), or a JSON spec")
@click.option("--target", default="torch", show_default=True, help="runtime whose latency is modelled")
@click.option("--memory-budget", help="whole model (tables + MLPs), e.g. 256MB")
@click.option("--max-auc-drop", type=float, help="AUC drop allowed, measured on --data (needs y)")
@click.option("--max-rel-error", type=float, help="per-table relative embedding error allowed")
@click.option("--latency-target", help="estimated latency bound at a batch size, e.g. 5ms@512")
@click.option("--batch", default=512, show_default=True, type=int, help="batch size the plan is optimised for")
@click.option("--samples", default=16384, show_default=True, type=int, help="samples of --data used")
@click.option("--profile", "profile_path", type=click.Path(path_type=Path),
              help="access profile JSON (`rewrite profile -o`); default: profile --data")
@click.option("--grid", "grid_path", type=click.Path(path_type=Path),
              help='JSON {"pass": ["opt=v:opt=v", ...]} replacing the built-in settings grid')
@click.option("--no-calibrate", is_flag=True, help="cpu-local: do not calibrate if no fit is stored")
@click.option("--explain", is_flag=True, help="per table: choice, runner-up, binding constraint")
@click.option("--plot", type=click.Path(path_type=Path), help="write the Pareto frontier plot here")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="write plan.json here")
@load_options
@json_option
def plan(path, data_path, hw_name, target, memory_budget, max_auc_drop, max_rel_error, latency_target,
         batch, samples, profile_path, grid_path, no_calibrate, explain, plot, output,
         interaction, qr_op, as_json) -> None:
    """Choose a representation per table and a path per batch size, under constraints."""
    from rewrite.cost.commands import human_plan, run_plan

    model = load_model(path, interaction, qr_op)
    result = run_plan(model, path, data_path, hw_name, target, memory_budget, max_auc_drop,
                      max_rel_error, latency_target, batch, samples, profile_path, grid_path,
                      not no_calibrate, explain, plot, output)
    emit(result, as_json, human_plan)


if __name__ == "__main__":
    sys.exit(main())
