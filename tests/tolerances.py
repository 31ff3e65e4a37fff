"""The one table of numerical tolerances every test compares with.

Keyed by what is compared: the storage dtype of a table, or a representation whose math differs
from the reference only in summation order.  ``assert_close`` passes when
|actual - expected| <= atol + rtol * |expected| elementwise (torch.testing semantics) and reports
the worst difference otherwise (tensors or numpy arrays; ``allclose`` is the same test as a
bool).  Pass and target tests add their own rows here, never inline; a new row's comment says
what error it allows and why, the arithmetic or the worst value measured with
``TOLERANCE_LOG=<file>`` (each comparison's worst error, appended) and the factor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    why: str


TOLERANCES: dict[str, Tolerance] = {
    # bit-identical: serialisation round trips, the same kernels on the same inputs
    "exact": Tolerance(0.0, 0.0, "same bytes in, same ops"),
    # fp32 math done in another order (segment-sum vs embedding_bag, bmm vs a Python loop):
    # the bar for loading a checkpoint is 1e-5 on the model's outputs
    "float32": Tolerance(1e-5, 1e-5, "fp32, different summation order"),
    # fp16/bf16 storage, fp32 accumulation: the reference reads the same rounded values, so only
    # the summation order differs (the storage rounding itself is not a tolerance)
    "float16": Tolerance(1e-5, 1e-5, "fp16 storage, fp32 accumulation"),
    "bfloat16": Tolerance(1e-5, 1e-5, "bf16 storage, fp32 accumulation"),
    # an fp16 table against the fp32 table it was made from: storage rounding is the error
    "fp16-rounded": Tolerance(1e-3, 1e-3, "fp16 storage of fp32 rows: 2^-11 relative rounding per element"),
    # a table of exactly the fitted TT rank against its TT-SVD / TTBag: float64 SVD round-off, then
    # fp32 cores and the fp32 product of 3 cores (each a few ulp of |W| ~ 1-10)
    "tt-exact": Tolerance(1e-5, 1e-5, "exact TT rank: SVD round-off, fp32 cores and products"),
    # ALS: each core update is the exact weighted least-squares minimiser given the others, so the
    # error cannot rise; only the float64 solve's round-off (ridge 1e-12 of the Gram diagonal) can
    "als-monotone": Tolerance(0.0, 1e-9, "exact minimiser per update, float64 solve round-off"),
    # a fit's reported weighted error (computed from its float64 cores, or the dequantized int8
    # ones) against the same error measured on the representation's fp32 lookups
    "fit-error-report": Tolerance(1e-6, 1e-4, "float64 fit error vs fp32 lookups"),
    # int8 kernels vs the tests' reference quantization (tests.targets.checks)
    "int8-row-scale": Tolerance(0.0, 1e-6, "max|x| / 127 per row: the kernel's fp32 ops vs torch's"),
    "int8-code": Tolerance(1.0, 0.0, "x * (1/s) vs x / s: at a .5 tie one ulp moves the code one step"),
    "int8-dequant": Tolerance(1e-6, 1e-6, "acc * sa * sw + b in fp32, another association / FMA"),
    # a whole int8 MLP vs its exact-integer reference: float64 vs fp32 dequantization, and a hidden
    # activation at a rounding tie may requantize one int8 step apart
    "int8-mlp-reference": Tolerance(1e-5, 1e-4, "fp32 epilogue vs float64, ties in requantization"),
    # the VNNI MLP vs its exact-integer reference, outputs divided by max |fp32 output|: one
    # activation step flipped at a tie moves an output by about scale / 127 of one input's share
    # (measured worst 5e-6 on the test's shapes, where no tie flipped)
    "vnni-mlp-reference": Tolerance(1e-3, 0.0, "relative to max |output|: a tie may flip one step"),
    # an int8 MLP vs the fp32 MLP, outputs divided by max |fp32 output|: int8 per-channel weights,
    # int8/uint8 per-row activations through 2-4 layers (measured worst 0.020: Int8Mlp on the top
    # MLP of test_int8_kernels; the VNNI shapes 0.009-0.015)
    "int8-mlp-vs-fp32": Tolerance(3e-2, 0.0, "int8 weights and activations, relative to max |output|"),
    # representations loaded from dlrm checkpoints, vs dlrm's own modules
    "table": Tolerance(1e-5, 1e-5, "plain table vs nn.EmbeddingBag"),
    "qr": Tolerance(1e-5, 1e-5, "QR vs dlrm's QREmbeddingBag"),
    "md": Tolerance(1e-5, 1e-5, "MD vs dlrm's PrEmbeddingBag (one extra matmul)"),
    # predict() probabilities vs dlrm's Sigmoid output
    "probability": Tolerance(1e-5, 0.0, "sigmoid of fp32 logits"),
}


def tolerance(key: str) -> Tolerance:
    return TOLERANCES[key]


def _tensor(x) -> torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x))


def max_abs_diff(actual, expected) -> float:
    actual, expected = _tensor(actual), _tensor(expected)
    return float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0


def _log(actual: torch.Tensor, expected: torch.Tensor, key: str, what: str) -> None:
    """With TOLERANCE_LOG=<file>, append the worst |diff|, |diff| / |expected| and share of the
    row's bound used: the measurements the rows' comments quote."""
    path = os.environ.get("TOLERANCE_LOG")
    if not path or not actual.numel():
        return
    tol, a, e = TOLERANCES[key], actual.double(), expected.double()
    d = (a - e).abs()
    rel = float((d / e.abs().clamp_min(1e-30)).max())
    bound = tol.atol + tol.rtol * e.abs()
    used = float(torch.where(bound > 0, d / bound, torch.where(d > 0, torch.inf, 0.0)).max())
    with open(path, "a") as f:
        f.write(f"{key}\t{what}\tmax_abs={float(d.max()):.3g}\tmax_rel={rel:.3g}\tused={used:.3g}\n")


def allclose(actual, expected, key: str) -> bool:
    """``assert_close``'s test as a bool, for checks that collect failures (threads)."""
    actual, expected = _tensor(actual), _tensor(expected)
    tol = TOLERANCES[key]
    return actual.shape == expected.shape and torch.allclose(
        actual.double(), expected.double(), atol=tol.atol, rtol=tol.rtol)


def assert_close(actual, expected, key: str, what: str = "") -> None:
    """Compare with the row ``key`` of the table; the message names the row and the worst error.
    Tensors or numpy arrays."""
    tol = TOLERANCES[key]
    actual, expected = _tensor(actual), _tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    _log(actual, expected, key, what)
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), atol=tol.atol, rtol=tol.rtol,
        msg=lambda m: f"{what} [{key}: {tol.why}] max |diff| {max_abs_diff(actual, expected):.3g}\n{m}")


# Compiled paths vs torch eager of the same model: (atol, rtol) on logits.  fp32: kernels differ
# only in summation order (worst 6e-8).  Lossy rows: about 4x the worst |Δlogit| measured on
# tests.representations.composite_model over tests.targets.checks.BATCHES (bf16 MLPs 1.2e-3,
# int8 MLPs 5.5e-3, int8 rows 9.7e-4).
PRECISION = {
    "fp32": (2e-5, 1e-5),
    "bf16-dense": (5e-3, 0.0),      # bf16 MLPs: 8-bit mantissa on every activation
    "int8-dense": (2e-2, 0.0),      # uint8 per-tensor activations, int8 per-channel weights
    "int8-tables": (4e-3, 0.0),     # row-wise int8 tables: |err| <= scale/2 per looked-up element
}
REPRESENTATION: dict[str, tuple[float, float]] = {}


def path_tolerance(precision: str, representation: str | None = None) -> tuple[float, float]:
    return REPRESENTATION.get(representation or "", PRECISION[precision])
