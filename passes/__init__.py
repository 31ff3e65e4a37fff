"""Representation passes: one representation per module (its nn.Module, its fit, its pass).

Importing this package registers every representation and pass.  Each pass also has a Python
configurator of the same name: ``passes.onehot(max_rows=64)`` == ``-p onehot:max_rows=64``.
"""

import rewrite  # noqa: F401  (first: rewrite.formats imports passes.mixed_dim; importing passes first was circular)
from passes import mixed_dim, onehot as _onehot_module, quotient_remainder  # noqa: F401
from passes import dhe as _dhe_module, hybrid as _hybrid_module  # noqa: F401
from passes import memrec as _memrec_module, robe as _robe_module  # noqa: F401
from rewrite.passinfra import ConfiguredPass, configure


def onehot(**options) -> ConfiguredPass:
    return configure("onehot", **options)


def dhe(**options) -> ConfiguredPass:
    return configure("dhe", **options)


def hybrid(**options) -> ConfiguredPass:
    return configure("hybrid", **options)


def memrec(**options) -> ConfiguredPass:
    return configure("memrec", **options)


def robe(**options) -> ConfiguredPass:
    return configure("robe", **options)
