"""Representation passes: one representation per module (its nn.Module, its fit, its pass).

Importing this package registers every representation and pass.  Each pass also has a Python
configurator of the same name: ``passes.quantize(bits=4)`` == ``-p quantize:bits=4``.
"""

import rewrite  # noqa: F401  (first: rewrite.formats imports pass modules back)
from passes import hashing, mixed_dim, onehot as _onehot_module, quantized, quotient_remainder  # noqa: F401
from passes import dim_pruning, hot_cold_split, tensor_train  # noqa: F401
from passes import dhe as _dhe_module, hybrid as _hybrid_module  # noqa: F401
from passes import memrec as _memrec_module, robe as _robe_module  # noqa: F401
from rewrite.passinfra import ConfiguredPass, configure


def onehot(**options) -> ConfiguredPass:
    return configure("onehot", **options)


def quantize(**options) -> ConfiguredPass:
    return configure("quantize", **options)


def md(**options) -> ConfiguredPass:
    return configure("md", **options)


def qr(**options) -> ConfiguredPass:
    return configure("qr", **options)


def hash(**options) -> ConfiguredPass:  # noqa: A001 (the pass is called hash)
    return configure("hash", **options)


def tt(**options) -> ConfiguredPass:
    return configure("tt", **options)


def prune_dims(**options) -> ConfiguredPass:
    return configure("prune-dims", **options)


def hot_cold(**options) -> ConfiguredPass:
    return configure("hot-cold", **options)


def dhe(**options) -> ConfiguredPass:
    return configure("dhe", **options)


def hybrid(**options) -> ConfiguredPass:
    return configure("hybrid", **options)


def memrec(**options) -> ConfiguredPass:
    return configure("memrec", **options)


def robe(**options) -> ConfiguredPass:
    return configure("robe", **options)
