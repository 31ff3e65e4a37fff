"""The ``rewrite`` command group and what its commands share (errors, ``--json``, model loading).

Exit codes: 0 success, 1 a verification failed, 2 bad input.  Results go to stdout (one JSON
object with ``--json``); progress bars and logs go to stderr.  ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

from rewrite.core.errors import RewriteError


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
