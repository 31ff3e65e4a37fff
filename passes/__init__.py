"""Representation passes: one representation per module (its nn.Module, its fit, its pass).

Importing this package registers every representation and pass.  Each pass also has a Python
configurator of the same name: ``passes.quantize(bits=4)`` == ``-p quantize:bits=4``.
"""

import rewrite  # noqa: F401  (first: rewrite.formats imports pass modules back)
from passes import mixed_dim, onehot as _onehot_module, quantized, quotient_remainder  # noqa: F401
from rewrite.passinfra import ConfiguredPass, configure


def onehot(**options) -> ConfiguredPass:
    return configure("onehot", **options)


def quantize(**options) -> ConfiguredPass:
    return configure("quantize", **options)
