"""The ``rewrite`` command: ``main`` (the click group) and every command, one module per area.

Exit codes: 0 success, 1 a verification failed, 2 bad input.  Results go to stdout (one JSON
object with ``--json``); progress bars and logs go to stderr.  ``--debug`` shows tracebacks.
"""

from rewrite.cli.group import main
from rewrite.cli import bundle_cmds, model_cmds, pass_cmds, serve_cmds  # noqa: F401  (register their commands on main)

__all__ = ["main"]
