"""Representation passes: one representation per module (its nn.Module, its fit, its pass).

Importing this package registers every representation and pass.  Each pass also has a Python
configurator of the same name: ``passes.onehot(max_rows=64)`` == ``-p onehot:max_rows=64``.
"""

import rewrite  # noqa: F401  (first: rewrite.formats imports pass modules; avoids a cycle)
from passes import mixed_dim, onehot as _onehot_module, quotient_remainder  # noqa: F401
from passes import dim_pruning, hot_cold_split, tensor_train  # noqa: F401
from rewrite.passinfra import ConfiguredPass, configure


def onehot(**options) -> ConfiguredPass:
    return configure("onehot", **options)


def tt(**options) -> ConfiguredPass:
    return configure("tt", **options)


def prune_dims(**options) -> ConfiguredPass:
    return configure("prune-dims", **options)


def hot_cold(**options) -> ConfiguredPass:
    return configure("hot-cold", **options)
