"""ONNX translations of the embedding-bag ops of ``rewrite.bag_ops`` (stock opset-18 ops, no Loop).

Before: ``dlrm_rewrite::gather_segment_sum(W [rows, D], idx [n], off [B+1])`` /
``segment_sum(V [n, D], off)``.
After:
    rows  = Cast<float>(Gather(W, idx))                        [n, D]   (segment_sum: V)
    marks = ScatterElements<add>(zeros[n+1], off[1:-1], 1)     a 1 where each interior bag starts
    bag   = CumSum(marks)[:-1]                                 [n]      bag of each row
    out   = ScatterND<add>(zeros[B, D], bag[:, None], rows)    [B, D]
Every row is added once into its bag (O(n·D), whatever the bag lengths; empty bags stay zero).
The former scatter-add form gave ScatterElements an [n, D] int64 index (one per element);
ScatterND indexes whole rows with [n, 1].  Measured alternatives (26 tables of 1M rows, d=16,
B=2048, one id per bag, ORT 1.32, one thread): ScatterND 3.3 ms, prefix sums in fp64 with two
Gathers 4.3 ms, padded [B, max_len] Gather + ReduceSum 12 ms (and quadratic on one long bag);
the bare Gather alone, with no pooling, takes 2.4 ms.
"""

from __future__ import annotations

from rewrite import bag_ops


def segment_sum(values, offsets):
    """out[b] = sum(values[offsets[b]:offsets[b+1]]) in fp32 -> [B, D]."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    n = op.Shape(values, start=0, end=1)
    marks = op.ConstantOfShape(op.Add(n, op.Constant(value_ints=[1])),
                               value=ir.tensor([0], dtype=ir.DataType.INT64))
    inner = op.Slice(offsets, op.Constant(value_ints=[1]), op.Constant(value_ints=[-1]))
    ones = op.Expand(op.Constant(value_ints=[1]), op.Shape(inner))
    marks = op.ScatterElements(marks, inner, ones, axis=0, reduction="add")
    bag = op.Slice(op.CumSum(marks, op.Constant(value_int=0)), op.Constant(value_ints=[0]),
                   op.Constant(value_ints=[-1]))
    batch = op.Sub(op.Shape(offsets), op.Constant(value_ints=[1]))
    shape = op.Concat(batch, op.Shape(values, start=1, end=2), axis=0)
    acc = op.ConstantOfShape(shape, value=ir.tensor([0.0], dtype=ir.DataType.FLOAT))
    rows = values if values.dtype == ir.DataType.FLOAT else op.Cast(values, to=ir.DataType.FLOAT)
    return op.ScatterND(acc, op.Unsqueeze(bag, op.Constant(value_ints=[1])), rows, reduction="add")


def gather_segment_sum(weight, indices, offsets):
    """out[b] = sum(weight[indices[offsets[b]:offsets[b+1]]]) in fp32 -> [B, D]."""
    from onnxscript import opset18 as op

    return segment_sum(op.Gather(weight, indices, axis=0), offsets)


TRANSLATIONS = {bag_ops.SEGMENT_SUM: segment_sum, bag_ops.GATHER_SEGMENT_SUM: gather_segment_sum}
