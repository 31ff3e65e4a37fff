"""``rewrite inspect``, ``profile``, ``hardware``, ``plan``: commands that read a model."""

from __future__ import annotations

from pathlib import Path

import click

from rewrite.cli.group import (emit, force_option, json_option, load_model, load_options, main, nproc_options,
                               refuse_existing)
from rewrite.core.errors import RewriteError


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@load_options
@json_option
def inspect(path: Path, interaction, qr_op, as_json: bool) -> None:
    """What a checkpoint or a bundle holds: tables, representations, bytes, MLPs (and paths)."""
    from rewrite.formats import is_dcp
    from rewrite.inspection import describe_bundle, describe_model, human_bytes

    if path.is_dir() and not is_dcp(path):     # a bundle (a DCP directory is a checkpoint)
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
@force_option
@load_options
@nproc_options
@json_option
def profile(path, data_path, sample_rate, coverage, hot_bytes, dense_transform, hash_mode,
            skip_bad_rows, output, force, interaction, qr_op, nproc, threads, as_json) -> None:
    """Per-table access statistics (FAE-style) on a sample of the data.  --nproc N (or torchrun):
    each rank counts its share of the data, the counts are summed."""
    from rewrite import distributed
    from rewrite.inspection import human_bytes
    from rewrite.core.units import parse_bytes

    if not 0 < coverage <= 1:
        raise RewriteError(f"--coverage must be in (0, 1], got {coverage}")
    refuse_existing(force, o=output)
    budget = parse_bytes(hot_bytes) if hot_bytes else None
    writes, result = distributed.run(nproc, threads, profile_rank,
                                     (path, data_path, sample_rate, coverage, budget, dense_transform,
                                      hash_mode, skip_bad_rows, output, interaction, qr_op))
    if not writes:     # torchrun's other ranks: rank 0 reports
        return

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


def profile_rank(group, path, data_path, sample_rate, coverage, budget, dense_transform, hash_mode,
                 skip_bad_rows, output, interaction, qr_op) -> dict:
    """``rewrite profile`` on one rank (picklable for ``--nproc``): rank 0 saves ``output``."""
    import numpy as np

    from rewrite import data
    from rewrite.profiling import profile as run_profile

    model = load_model(path, interaction, qr_op)
    ds = data.open(data_path, dense_transform, model=model, hash_mode=hash_mode,
                   skip_bad_rows=skip_bad_rows)
    prof = run_profile(model, ds, sample_rate, group=group)
    skipped = int(group.all_reduce_sum(np.array([ds.skipped_rows], dtype=np.int64))[0])
    if output and group.writes:
        prof.save(output, coverage, budget)
    result = prof.to_json(coverage, budget)
    result.pop("counts")
    result["skipped_bad_rows"] = skipped
    return result


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
@click.option("--recover", "recover_path", type=click.Path(path_type=Path),
              help="measure the best few candidates after recovery (distillation) on this labelled "
                   ".npz, kept apart from --data; compile --plan recovers the same way")
@click.option("--recover-candidates", default=3, show_default=True, type=int,
              help="with --recover: how many candidates (smallest estimated AUC drop first) to recover")
@click.option("--recover-top", is_flag=True, help="with --recover: recovery also trains the top MLP")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="write plan.json here")
@force_option
@load_options
@json_option
def plan(path, data_path, hw_name, target, memory_budget, max_auc_drop, max_rel_error, latency_target,
         batch, samples, profile_path, grid_path, no_calibrate, explain, plot, recover_path,
         recover_candidates, recover_top, output, force, interaction, qr_op, as_json) -> None:
    """Choose a representation per table and a path per batch size, under constraints."""
    from rewrite.cost.commands import human_plan, run_plan

    refuse_existing(force, o=output, plot=plot)
    model = load_model(path, interaction, qr_op)
    result = run_plan(model, path, data_path, hw_name, target, memory_budget, max_auc_drop,
                      max_rel_error, latency_target, batch, samples, profile_path, grid_path,
                      not no_calibrate, explain, plot, output, recover_path, recover_candidates,
                      recover_top)
    emit(result, as_json, human_plan)
