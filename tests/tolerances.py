"""The tolerances every test shares: one table, by arithmetic precision of the compared path.

A compiled path is compared with torch eager fp32 of the same model; the bound is on
max |logit_path - logit_reference| (atol) plus rtol * |logit_reference|.  Representations
that change numerics (fp16/bf16 storage, QR, MD) are compared with the same model in eager,
so they share their precision's row; add a row to REPRESENTATION if one ever needs more.
"""

# (atol, rtol) on logits.  fp32: kernels differ only in summation order.  Lossy rows: measured
# worst on the composite test model x ~3 (tests/targets/test_*.py print nothing; see git log).
PRECISION = {
    "fp32": (2e-5, 1e-5),
    "bf16-dense": (0.15, 0.03),     # bf16 MLPs: 8-bit mantissa on every activation
    "int8-dense": (0.6, 0.1),       # uint8 per-tensor activations, int8 per-channel weights
    "int8-tables": (0.05, 0.01),    # row-wise int8 tables: |err| <= scale/2 per looked-up element
}
REPRESENTATION: dict[str, tuple[float, float]] = {}


def tolerance(precision: str, representation: str | None = None) -> tuple[float, float]:
    return REPRESENTATION.get(representation or "", PRECISION[precision])
