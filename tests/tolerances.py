"""The tolerances every test shares: one table, by arithmetic precision of the compared path.

A compiled path is compared with torch eager fp32 of the same model; the bound is on
max |logit_path - logit_reference| (atol) plus rtol * |logit_reference|.  Representations
that change numerics (fp16/bf16 storage, QR, MD) are compared with the same model in eager,
so they share their precision's row; add a row to REPRESENTATION if one ever needs more.
"""

# (atol, rtol) on logits.  fp32: kernels differ only in summation order (worst 6e-8).  Lossy
# rows: about 4x the worst |Δlogit| measured on tests.representations.composite_model over
# tests.targets.checks.BATCHES (bf16 MLPs 1.2e-3, int8 MLPs 5.5e-3, int8 rows 9.7e-4).
PRECISION = {
    "fp32": (2e-5, 1e-5),
    "bf16-dense": (5e-3, 0.0),      # bf16 MLPs: 8-bit mantissa on every activation
    "int8-dense": (2e-2, 0.0),      # uint8 per-tensor activations, int8 per-channel weights
    "int8-tables": (4e-3, 0.0),     # row-wise int8 tables: |err| <= scale/2 per looked-up element
}
REPRESENTATION: dict[str, tuple[float, float]] = {}


def tolerance(precision: str, representation: str | None = None) -> tuple[float, float]:
    return REPRESENTATION.get(representation or "", PRECISION[precision])
