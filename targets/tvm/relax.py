"""torch -> Relax: the import route both TVM targets share.

Before: a RecModel, seen through ``ExportedBags`` (``forward(dense, idx_0, off_0, ...)``).
After:  a Relax IRModule ``main(dense, idx_0, off_0, ..., idx_{F-1}, off_{F-1}, *params)`` with a
symbolic batch B (offsets are B + 1 long) and a symbolic lookup count n_f per feature (n_f >= 0),
the parameters as trailing runtime inputs (``keep_params_as_input``), never baked-in constants.

Route: ``torch.export`` (size-oblivious, so batch 1 and empty features are not specialised away)
(inside ``rewrite.core.bag_ops.lowering()``, so tables pool through ``dlrm_rewrite::`` ops)
then ``tvm.relax.frontend.torch.from_exported_program`` with converters for those ops and for
what TVM 0.27's importer lacks or gets wrong on these graphs:
  * ``dlrm_rewrite::gather_segment_sum`` / ``segment_sum`` -> ``call_tir`` of one fused
    lookup + pooling kernel per call (``targets.tvm.bags``; CPU or CUDA variant by target);
  * ``cat`` (and the ``view`` after it, ``stack``'s decomposition) on the CPU -> one kernel that
    pools bag inputs in place and copies the others (``targets.tvm.bags``), instead of TVM's
    per-element if_then_else chain;
  * ``scatter_add``                 -> ``scatter_elements(reduction="add")`` (graphs exported
    outside ``lowering()``, e.g. by benchmarks);
  * ``div(x, c, rounding_mode=...)`` on integers: the importer makes an int32 constant against
    int64 ids (a type error); here the constant takes x's dtype and "trunc" lowers to ``divide``
    (TIR's integer division truncates), "floor" to ``floor_divide``.  ``remainder`` is the
    importer's ``floor_mod``.  QR's trunc division and remainder are exact on ids up to 3e9
    (tests/targets/tvm/test_llvm.py); the int64 floor-division miscompile noted for older
    TVM did not reproduce in 0.27 with constant divisors;
  * ``slice(x, d, a, INT64_MAX)``    -> end = x's extent (``offsets[1:]``): TVM keeps
    ``min(INT64_MAX - 1, B)``, and its simplifier then overflows int64;
  * ``clamp`` with one open bound   -> maximum/minimum (the importer casts +-inf to an integer).
The ONNX route (``torch.onnx.export`` + ``relax.frontend.onnx.from_onnx``) fails on these graphs
in 0.27: its ``Expand`` converter needs a constant shape, and the exporter writes trunc division
as Div/Abs/Sign/Floor; so only the torch route is used.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import fx

from rewrite.core import bag_ops
from rewrite.core.errors import RewriteError
from rewrite.core.model import RecModel
from targets.base import ExportedBags
from targets.tvm.bags import convert_cat, convert_view, emit_bag_op

INT_SLICE_END = 2**62    # slice ends at or above this mean "to the end" (torch writes INT64_MAX)


def trace_inputs(model: RecModel) -> tuple[torch.Tensor, ...]:
    """A 5-sample batch with n_f = 11 + f lookups and valid ids (values do not matter).

    No traced size is 0 or 1, B - 1 included (``offsets[1:-1]``): tracing B = 2 let a
    broadcast check guard B - 1 == 1, which pins the batch size.
    """
    bags: list[torch.Tensor] = []
    for f, table in enumerate(model.feature_tables):
        n = 11 + f
        bags.append(torch.arange(n, dtype=torch.int64) % model.embeddings[table].rows)
        bags.append(torch.tensor([0, 2, 5, 5, n - 3, n], dtype=torch.int64))
    return (torch.zeros(5, model.spec.n_dense), *bags)


def export(model: RecModel) -> torch.export.ExportedProgram:
    """ExportedBags(model) with dynamic batch and lookup counts, decomposed to core ATen.

    Size-oblivious (sizes 0 and 1 are not special-cased, so batch 1 and empty features run)
    and without duck sizing (dims whose traced sizes coincide stay distinct symbols).  A batch
    pinned anyway is refused rather than compiled.
    """
    from torch.export import Dim
    import torch.fx.experimental._config as fx_config

    args = trace_inputs(model)
    batch = Dim("batch", min=1)
    shapes = {"dense": {0: batch},
              "bags": tuple({0: Dim(f"n_{i // 2}", min=0) if i % 2 == 0 else batch + 1}
                            for i in range(len(args) - 1))}
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True, use_duck_shape=False), \
            bag_ops.lowering():
        ep = torch.export.export(ExportedBags(model).eval(), args, dynamic_shapes=shapes)
    dense = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "dense")
    if isinstance(dense.meta["val"].shape[0], int):
        raise RewriteError("torch.export pinned the batch size of the model; TVM targets need "
                           "a dynamic batch")
    return ep.run_decompositions()


def _op_name(node: fx.Node) -> str:
    return node.target.__name__


def _table_of(node: fx.Node) -> str:
    """The table whose module emitted ``node`` ("model.embeddings.<t>"), or the model part."""
    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    for path in stack:
        parts = path.split(".")
        if "embeddings" in parts and parts.index("embeddings") + 1 < len(parts):
            return "table " + parts[parts.index("embeddings") + 1]
    inner = [p for p in stack if p]
    return f"module {inner[-1]}" if inner else "the model"


def _where(node: fx.Node) -> str:
    return f"op {_op_name(node)} in {_table_of(node)}"


# ---- converters: (node, importer) -> relax expression ------------------------------------------

def _scatter_add(node: fx.Node, imp) -> Any:
    from tvm import relax

    x, dim, index, src = node.args[:4]
    return imp.block_builder.emit(relax.op.scatter_elements(
        imp.env[x], imp.env[index], imp.env[src], axis=dim, reduction="add"))


def _dtype(imp, expr) -> str:
    return str(expr.ty.dtype)


def _scalar_like(imp, value, like) -> Any:
    from tvm import relax

    return relax.const(value, _dtype(imp, like))


def _div_mode(node: fx.Node, imp) -> Any:
    """div(x, y, rounding_mode) with y cast to x's dtype.  Integers: "trunc" -> ``divide``
    (TIR's integer division truncates), "floor" -> ``floor_divide``; floats: divide + trunc/floor."""
    from tvm import relax

    x = imp.env[node.args[0]]
    y = node.args[1]
    y = imp.env[y] if isinstance(y, fx.Node) else _scalar_like(imp, y, x)
    mode = node.kwargs.get("rounding_mode", node.args[2] if len(node.args) > 2 else None)
    emit = imp.block_builder.emit
    if _dtype(imp, x).startswith(("int", "uint")):
        return emit(relax.op.floor_divide(x, y) if mode == "floor" else relax.op.divide(x, y))
    q = emit(relax.op.divide(x, y))
    return emit(relax.op.trunc(q) if mode == "trunc" else relax.op.floor(q))


def _slice(node: fx.Node, imp) -> Any:
    """x[start:end:step] along dim; an open end is x's extent, and a non-negative constant
    start with an open end is in bounds, so the result's extent stays ``extent - start``
    (without ``assume_inbound`` TVM writes min/max/if_then_else shapes CUDA's FuseOps rejects)."""
    from tvm import relax

    args = list(node.args) + [None] * (5 - len(node.args))
    x, dim, start, end, step = imp.env[args[0]], args[1] or 0, args[2] or 0, args[3], args[4] or 1
    extent = imp.shape_of(x)[dim]
    open_end = end is None or (isinstance(end, int) and end >= INT_SLICE_END)
    if open_end:
        end = extent
    start, end, step = (imp.env[v] if isinstance(v, fx.Node) else v for v in (start, end, step))
    if open_end and start == 0 and step == 1:
        return x
    inbound = open_end and isinstance(start, int) and start >= 0 and step == 1
    return imp.block_builder.emit(relax.op.strided_slice(x, [dim], [start], [end], [step],
                                                         assume_inbound=inbound))


def _clamp(node: fx.Node, imp) -> Any:
    from tvm import relax

    x = imp.env[node.args[0]]
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    for bound, op in ((lo, relax.op.maximum), (hi, relax.op.minimum)):
        if bound is not None and not (isinstance(bound, float) and math.isinf(bound)):
            x = imp.block_builder.emit(op(x, _scalar_like(imp, bound, x)))
    return x


CONVERTERS = {"scatter_add.default": _scatter_add, "div.Tensor_mode": _div_mode,
              "slice.Tensor": _slice, "clamp.default": _clamp}


def target_converters(cuda: bool, defaults: dict[str, Any]) -> dict[str, Any]:
    """Converters whose kernels depend on the device: the ``rewrite.core.bag_ops`` ops (CPU or CUDA
    kernel) and, on the CPU, ``cat`` and ``view`` of them (core ATen writes ``stack`` as cat +
    view; ``defaults``: the importer's own converters, for views of anything else)."""
    def bags(node: fx.Node, imp) -> Any:
        return emit_bag_op(imp, [imp.env[a] for a in node.args], cuda)

    out = {op.__name__: bags for op in (bag_ops.SEGMENT_SUM, bag_ops.GATHER_SEGMENT_SUM)}
    if not cuda:
        out["cat.default"] = convert_cat
        out["view.default"] = partial(convert_view, fallback=defaults["view.default"])
    return out


def to_relax(ep: torch.export.ExportedProgram, target_name: str):
    """ExportedProgram -> (IRModule with params as inputs, [param tensors], [param names]).

    Raises RewriteError naming the op and the table when TVM's importer has no converter for an
    op, or a converter fails on it.
    """
    from tvm import relax
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    importer = ExportedProgramImporter()
    converters = {**CONVERTERS, **target_converters(target_name.endswith("cuda"),
                                                    dict(importer.convert_map))}
    known = set(importer.convert_map) | set(converters)
    missing = [n for n in ep.graph.nodes if n.op == "call_function" and _op_name(n) not in known]
    if missing:
        raise RewriteError(f"{target_name}: TVM cannot lower " + "; ".join(
            sorted({_where(n) for n in missing})) + " (no Relax converter in TVM's importer)")
    try:
        mod = importer.from_exported_program(ep, True, True, False, converters)
    except Exception as e:  # noqa: BLE001  (name the node the importer stopped at)
        done = set(importer.env)
        failed = next((n for n in ep.graph.nodes if n.op == "call_function" and n not in done), None)
        where = _where(failed) if failed is not None else "the graph"
        raise RewriteError(f"{target_name}: TVM cannot lower {where}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    mod = relax.transform.DeadCodeElimination(["main"])(mod)   # bag calls fused into a cat
    mod, params = relax.frontend.detach_params(mod)
    func = mod["main"]
    n_inputs = int(func.attrs["num_input"])
    names = [p.name for p in func.params[n_inputs:]]
    return mod, params.get("main", []), names


def relax_ops(mod) -> set[str]:
    """The Relax operator names ``main`` calls (for checks and reports)."""
    from tvm import relax

    import tvm

    ops: set[str] = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            ops.add(expr.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return ops

