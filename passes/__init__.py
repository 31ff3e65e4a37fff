"""Representation passes: one representation per module (its nn.Module, its fit, its pass).

Importing this package registers every representation, so specs naming them can be loaded.
"""

from passes import mixed_dim, quotient_remainder  # noqa: F401
