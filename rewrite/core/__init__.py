"""The core: what passes, targets and the driver all stand on, importing nothing above it.

The canonical model (``model``) and its batch convention (``batch``), the representation
contract and bag ops (``embedding``, ``bag_ops``), the pass contract (``pass_contract``), the
registries (``registry``), tracing, access profiles, the native model file, synthetic batches,
metrics, timing, ISA tiers, units, errors and atomic writes.  ``tests/test_layers.py`` checks
that no module here imports ``passes``, ``targets`` or the driver.
"""
