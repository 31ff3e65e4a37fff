"""`rewrite apply` and `rewrite passes`: the representation passes on the command line."""

from __future__ import annotations

from pathlib import Path

import click

from rewrite.cli.group import (MAX_AUC_DROP_DEFAULT, LazyOptionsCommand, emit, force_option, json_option,
                               load_options, main, max_auc_drop_option, nproc_options)


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
@max_auc_drop_option
@click.option("--allow-degraded", is_flag=True,
              help="write the model even if a table exceeds its tolerance or the AUC gate fails")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="the rewritten model (native safetensors), written atomically")
@force_option
@load_options
@nproc_options
@json_option
def apply_command(path, pass_specs, data_path, profile_path, samples, dense_transform, max_auc_drop,
                  allow_degraded, output, force, interaction, qr_op, nproc, threads, as_json, **recovery) -> None:
    """Rewrite tables with passes, verify against the original, optionally recover by
    distillation (--recover DATA), write one file.  --nproc N (or torchrun) fits the tables on N
    ranks; rank 0 writes."""
    from rewrite import distributed
    from rewrite.core.pass_contract import parse_pass
    from rewrite.rewriting import apply_rank, check_output, summary

    for spec in pass_specs:         # bad input fails here, before any rank starts
        parse_pass(spec)
    check_output(output, force)

    options = dict(data_path=data_path, profile_path=profile_path, samples=samples,
                   dense_transform=dense_transform, allow_degraded=allow_degraded, output=output,
                   recovery=recovery, force=force,
                   max_auc_drop=MAX_AUC_DROP_DEFAULT if max_auc_drop is None else max_auc_drop)
    writes, result = distributed.run(nproc, threads, apply_rank, (path, list(pass_specs), interaction, qr_op, options))
    if not writes:     # torchrun's other ranks: rank 0 reports
        return
    emit(result, as_json, summary)
    if not result["written"]:
        from rewrite.core.errors import VerificationError

        raise VerificationError(result["failure"])


WIDTH = 100     # columns of `rewrite passes` text output


@main.command("passes")
@click.argument("name", required=False)
@json_option
def passes_command(name: str | None, as_json: bool) -> None:
    """Every pass (one table: what it does, which tables its defaults touch), or NAME's options in
    full (type, default, meaning)."""
    from rewrite.core.errors import RewriteError
    from rewrite.core.pass_contract import PASSES, get_pass, option_rows

    get_pass("onehot")   # imports and registers every pass
    if name is not None and name not in PASSES:
        raise RewriteError(f"unknown pass {name!r} (known: {', '.join(sorted(PASSES))})")
    chosen = sorted(PASSES.items()) if name is None else [(name, PASSES[name])]
    result = {"passes": [{"name": n, "summary": info.summary, "defaults_touch": info.config().touches(),
                          "options": [{"name": o, "type": t, "default": d, "help": h}
                                      for o, t, d, h in option_rows(info)]}
                         for n, info in chosen]}
    emit(result, as_json, pass_table if name is None else pass_options)


def pass_table(d) -> str:
    """``rewrite passes``: one row per pass, wrapped to ``WIDTH`` columns."""
    import textwrap

    name_w = max(len(p["name"]) for p in d["passes"]) + 2
    touch_w = 26
    what_w = WIDTH - name_w - touch_w - 2
    lines = [f"{'pass':<{name_w}}{'what it does':<{what_w}}  {'defaults touch':<{touch_w}}".rstrip()]
    for p in d["passes"]:
        what = textwrap.wrap(p["summary"], what_w)
        touch = textwrap.wrap(p["defaults_touch"], touch_w)
        for i in range(max(len(what), len(touch))):
            left = p["name"] if i == 0 else ""
            mid = what[i] if i < len(what) else ""
            right = touch[i] if i < len(touch) else ""
            lines.append(f"{left:<{name_w}}{mid:<{what_w}}  {right}".rstrip())
    lines.append("")
    lines += textwrap.wrap("`rewrite passes NAME` lists a pass's options; give them as "
                           "-p NAME:option=value:option=value (docs/passes.md: the math of each).", WIDTH)
    return "\n".join(lines)


def pass_options(d) -> str:
    """``rewrite passes NAME``: the pass, then each option with its type, default and full help."""
    import textwrap

    p = d["passes"][0]
    lines = textwrap.wrap(f"{p['name']}: {p['summary']}", WIDTH, subsequent_indent="  ")
    lines.append(f"  defaults touch: {p['defaults_touch']}")
    lines.append("")
    opt_w = max(len(o["name"]) for o in p["options"]) + 2
    type_w = max(len(o["type"]) for o in p["options"]) + 2
    lines.append(f"  {'option':<{opt_w}}{'type':<{type_w}}default")
    for o in p["options"]:
        lines.append(f"  {o['name']:<{opt_w}}{o['type']:<{type_w}}{o['default'] or '(all)'}")
        if o["help"]:
            lines += textwrap.wrap(o["help"], WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines += ["", f"  give options as -p {p['name']}:option=value:option=value (a list: tables=t1,t2)"]
    return "\n".join(lines)
