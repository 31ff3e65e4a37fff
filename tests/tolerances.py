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
    # the fused engine's pooled bags vs each representation's eager forward: the same fp32 rows
    # (or decoded codes, QR products, MD / prune-dims projections) summed in another order
    # (measured worst 6.6e-7 on rows of scale 0.3, composite model, avx512 tier)
    "fused-lookup": Tolerance(1e-5, 1e-5, "fp32 bag sums and projections in another order"),
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
    # -- rows with "measured" were measured with TOLERANCE_LOG (below) on this branch's tests;
    #    "used" is the worst |diff| / (atol + rtol |expected|) over the test's comparisons --
    # a compiled fp32 path (TVM llvm / cuda, onnx-cpu) vs eager on logits, asserted directly by
    # the test: fp32 summation order only (measured worst 1.9e-6 abs, used 0.29: TVM llvm on the
    # composite model's b1500-long batch; kaggle-shaped kernels 0.08, onnx-cpu plans 0.02); the
    # tighter sibling of PRECISION["fp32"] below, which gates every target through
    # checks.assert_matches_eager and could take this row's values
    "compiled-fp32-logits": Tolerance(2e-6, 1e-5, "compiled fp32 kernels vs eager: summation order"),
    # a checkpoint loaded from another framework (torchrec, DCN) vs that framework's module on
    # logits: the 1e-5 bar (measured 0: the same ops in the same order today)
    "checkpoint-logits": Tolerance(1e-5, 0.0, "checkpoint vs its framework's module, the issue's bar"),
    # fp32 lookups pooled in fp32 vs float64 reference_bags over the same fp32 rows (|rows| <~ 1,
    # bags of <= ~10): n * 2^-24 * max|row| is ~1e-7 (measured worst 1.3e-7, pruned t0; robe 1.8e-8)
    "pooled-fp32": Tolerance(1e-6, 0.0, "fp32 bag sums of unit-scale rows vs float64 sums"),
    # prune-dims' stored rows vs float64 W @ V_d V_d^T: fp32 rotation and fp32 storage
    # (measured worst 6.8e-8 on rows ~1: 15x)
    "projected-rows": Tolerance(1e-6, 0.0, "fp32 projection of unit-scale rows vs float64"),
    # a DHE / hybrid decoder MLP (fp32, Mish, 2-3 layers) vs the same weights in float64 numpy
    # (measured worst 4.9e-6 abs, used 0.02: the bound is what the tests asserted before)
    "decoder-mlp": Tolerance(2e-5, 2e-4, "fp32 decoder MLP vs float64 reference"),
    # a fitted slot / bucket / QR factor that is a weighted mean of fp32 rows, stored in fp32, vs
    # the float64 mean: rounding to fp32 is <= 2^-24 = 6e-8 relative (measured worst 5.9e-8
    # relative, used 0.3)
    "weighted-mean-fit": Tolerance(1e-7, 1e-7, "fp32 storage of a float64 weighted mean"),
    # mixed-dim's weighted rank-k fit vs numpy's float64 SVD of diag(sqrt w) W (measured worst
    # 3.4e-7 on entries ~1: used 0.03)
    "low-rank-fit": Tolerance(1e-5, 1e-7, "weighted low-rank fit vs float64 SVD"),
    # fit_qr on a table of exact QR form, or vs the per-column rank-1 SVD (measured worst 9.5e-7:
    # used 0.01; the bound is the tests' earlier one)
    "qr-fit": Tolerance(1e-4, 1e-7, "QR factor fit vs exact / SVD, fp32 factors"),
    # a bf16 output vs the fp32 reference rounded to bf16: fp32 sums in another order may round
    # to the neighbouring bf16 value, one ulp = 2^-8..2^-7 relative (rtol 8e-3 = 2^-7); atol for
    # values near 0 (measured worst 1.5e-5 abs: embed_interact, used 0.015)
    "bf16-rounded": Tolerance(1e-3, 8e-3, "one bf16 ulp: fp32 sums in another order, then rounding"),
    # embed_interact_q8's per-row scale max|z| / 127, z fp32 dot products computed in another order
    # than torch's: a few fp32 ulp of the row max (measured worst 4.1e-7 relative: used 0.04)
    "interaction-row-scale": Tolerance(0.0, 1e-5, "max|z| / 127 of fp32 sums in another order"),
    # a bf16 MLP (bf16 inputs, weights and activations, fp32 sums) vs the fp32 MLP through 3-4
    # layers (measured worst 1.4e-3, OneDnnMlp [367, 512, 256, 1]: used 0.05)
    "bf16-mlp-vs-fp32": Tolerance(3e-2, 3e-2, "bf16 weights and activations vs fp32"),
    # AmxMlp's fp32 logit vs its bf16 emulation: a hidden activation whose fp32 sum (another
    # order) sits at a bf16 rounding boundary moves one ulp (2^-8 relative) and the logit by its
    # weight's share (not measurable here: no AMX)
    "amx-logit-vs-emulated": Tolerance(2e-3, 2e-3, "bf16 hidden activations at a rounding tie"),
    # AmxMlp's bf16 outputs vs its emulation: one bf16 ulp (up to 2^-7 relative) per output, plus
    # an upstream flipped activation (not measurable here: no AMX)
    "bf16-vs-emulated": Tolerance(1e-2, 1e-2, "bf16 outputs: one ulp plus an upstream tie"),
    # predict()'s fp32 sigmoid vs numpy's of the same logits: a few fp32 ulp relative (measured
    # worst 6.2e-8 relative: used 0.06)
    "sigmoid": Tolerance(0.0, 1e-6, "fp32 sigmoid vs float64 of the same logits"),
    # the same path's probabilities for a request alone and merged into a larger batch (serving's
    # batching, concurrent calls): kernels may block by batch size, fp32 order only, and sigmoid's
    # slope <= 1/4 (measured 0: bit-identical on onnx-cpu, torch, tvm-llvm)
    "probability-rebatched": Tolerance(1e-6, 0.0, "same path, another batch: fp32 order only"),
    # the readers' fp32 log(x + 1) / log(x + 3) vs float64: fp32 log is within an ulp (2^-23),
    # plus rounding to fp32 (measured worst 8.9e-8 relative: used 0.09)
    "dense-transform": Tolerance(0.0, 1e-6, "fp32 log vs float64"),
    # torchrec's stored fp32 log(x + 3) read back as dlrm's log(x + 1) via exp: the fp32 log's
    # 2^-24 relative error grows by |log(x + 3)| (<= ~20) through exp (measured worst 9.5e-7 abs:
    # used 0.006)
    "dense-log3-as-log1p": Tolerance(2e-6, 2e-5, "exp of a stored fp32 log, re-logged"),
    # the cost model's least-squares fit of theta: noiseless terms recover it to float64 round-off
    # (measured 5e-16 relative); with 3% multiplicative noise on 200 points each theta within 10%
    # (measured worst 1.4%: used 0.14)
    "least-squares-exact": Tolerance(1e-8, 1e-6, "noiseless float64 least squares"),
    "least-squares-3pct-noise": Tolerance(1e-8, 0.1, "3% noise on 200 points"),
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
