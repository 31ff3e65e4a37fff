"""Representation passes: one representation per module (its nn.Module, its fit, its pass).

This package is the one place that lists them: importing it registers every representation and
pass (``rewrite.core.registry``; the registries import it on their first lookup).  Each pass also
has a Python configurator named after it, generated from the registry (``-`` becomes ``_``):
``passes.quantize(bits=4)`` == ``-p quantize:bits=4``, ``passes.prune_dims(keep=0.25)``.
"""

from passes import quantized, mixed_dim, quotient_remainder, hashing, onehot  # noqa: F401
from passes import tensor_train, dim_pruning, hot_cold_split  # noqa: F401
from passes import dhe, hybrid, memrec, robe, md_quantized  # noqa: F401
from rewrite.core.pass_contract import PASSES, ConfiguredPass, configure

def _configurator(name: str):
    def make(**options) -> ConfiguredPass:
        return configure(name, **options)

    make.__name__ = make.__qualname__ = name.replace("-", "_")
    make.__doc__ = f"``-p {name}``: {PASSES[name].summary}  Options: ``rewrite passes``."
    return make

CONFIGURATORS = {name.replace("-", "_"): _configurator(name) for name in PASSES}
globals().update(CONFIGURATORS)
__all__ = sorted(CONFIGURATORS)
