"""The ``rewrite`` command group and what its commands share (errors, ``--json``, model loading).

Exit codes: 0 success, 1 a verification failed, 2 bad input.  Results go to stdout (one JSON
object with ``--json``); progress bars and logs go to stderr.  ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
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


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) as null, so the text parses with a
    strict JSON parser (Python's json writes a bare ``NaN`` otherwise)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def emit(result: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        click.echo(json.dumps(strict_json(result), indent=1, default=str, allow_nan=False))
    else:
        click.echo(human(result))


# Third-party messages that say nothing to a user of this tool (kept with --debug): torch's ONNX
# exporter lists the torchvision ops it skips, torch.export warns about its own pytree API.
QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration",)
QUIET_WARNINGS = (r".*LeafSpec.*", r".*TreeSpec.*")


def quiet_third_party() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


class LazyOptionsCommand(click.Command):
    """A command some of whose options come from a module that is heavy to import (e.g.
    ``rewrite.recovery``, which imports torch): ``options`` is a callable returning a decorator
    that adds them, called the first time the command's parameters are needed (to parse its
    arguments or show its help), so listing the commands (``rewrite --help``) imports nothing."""

    def __init__(self, *args: Any, options: Callable[[], Callable] | None = None, **kwargs: Any) -> None:
        self._lazy_options = options
        super().__init__(*args, **kwargs)

    @property
    def params(self) -> list[click.Parameter]:
        if self._lazy_options is not None:
            add, self._lazy_options = self._lazy_options, None

            def holder() -> None: ...

            add()(holder)
            self._params.extend(reversed(getattr(holder, "__click_params__", [])))
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = value


json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
force_option = click.option("--force", is_flag=True, help="replace an existing output (refused otherwise)")
MAX_AUC_DROP_DEFAULT = 0.005     # rewrite.rewriting.DEFAULT_MAX_AUC_DROP (not imported: it loads numpy)


def max_auc_drop_option(f):
    return click.option("--max-auc-drop", type=click.FloatRange(min=0), default=None,
                        help=f"exit 1, writing nothing, when the rewrite loses more AUC than this on "
                             f"labelled --data [default: {MAX_AUC_DROP_DEFAULT}; without labels it is "
                             f"not measured and does not apply]")(f)


def refuse_existing(force: bool, **outputs: Path | None) -> None:
    """Exit 2 before any work when an output the user named exists and there is no ``--force``;
    ``outputs``: option text -> path (``o="..."`` is ``-o``)."""
    from rewrite.core.atomic import check_new_output

    for option, path in outputs.items():
        check_new_output(path, force, "-o" if option == "o" else "--" + option.replace("_", "-"))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks instead of one-line errors")
@click.version_option(package_name="dlrm-rewrite")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Rewrite a trained DLRM's embedding tables, compile the result, pick a path."""
    ctx.meta["debug"] = debug
    if not debug:
        quiet_third_party()


def load_options(f):
    f = click.option("--interaction", type=click.Choice(["dot", "dot-self", "cat"]),
                     help="dlrm files: the interaction, where layer widths cannot tell")(f)
    f = click.option("--qr-op", type=click.Choice(["mult", "add", "concat"]),
                     help="dlrm files: --qr-operation used in training (not stored in the file)")(f)
    return f


def nproc_options(f):
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="torch threads per rank [default: torch's on one process, the cores / N on N]; "
                          "results are byte-identical across N at equal --threads")(f)
    f = click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                     help="run on N local processes (torch.distributed, gloo on 127.0.0.1); under "
                          "torchrun leave it at 1: the ranks come from the environment")(f)
    return f


def load_model(path: Path, interaction: str | None, qr_op: str | None):
    from rewrite.formats import load

    overrides = {k: v for k, v in (("interaction", interaction), ("qr_op", qr_op)) if v}
    return load(path, **overrides)
