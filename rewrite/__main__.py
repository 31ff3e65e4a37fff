"""``python -m rewrite``: the ``rewrite`` command, so that ``torchrun ... -m rewrite apply ...`` runs it."""

from rewrite.cli import main

main(prog_name="rewrite")
