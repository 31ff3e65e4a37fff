"""`rewrite apply` and `rewrite passes`: the representation passes on the command line."""

from __future__ import annotations

from pathlib import Path

import click

from rewrite.cli.group import LazyOptionsCommand, emit, json_option, load_model, load_options, main


def _recovery_options():
    from rewrite.recovery import add_recovery_options   # imports torch: only when apply runs or shows help

    return add_recovery_options


@main.command("apply", cls=LazyOptionsCommand, options=_recovery_options)
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
@load_options
@json_option
def apply_command(path, pass_specs, data_path, profile_path, samples, dense_transform, allow_degraded,
                  output, interaction, qr_op, as_json, **recovery) -> None:
    """Rewrite tables with passes, verify against the original, optionally recover by
    distillation (--recover DATA), write one file."""
    from rewrite.rewriting import run_apply, summary

    result = run_apply(path, pass_specs, data_path, profile_path, samples, dense_transform,
                       allow_degraded, output, load_model=lambda p: load_model(p, interaction, qr_op),
                       recovery=recovery)
    emit(result, as_json, summary)
    if not result["written"]:
        from rewrite.core.errors import VerificationError

        raise VerificationError(result["failure"])


@main.command("passes")
@json_option
def passes_command(as_json: bool) -> None:
    """Every pass, its options (type, default) and which tables its defaults touch."""
    from rewrite.core.pass_contract import PASSES, get_pass, option_rows

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
