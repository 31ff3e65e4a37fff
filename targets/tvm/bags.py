"""TVM kernels for the embedding-bag ops of ``rewrite.core.bag_ops``, and for concatenating bags.

Before: ``dlrm_rewrite::gather_segment_sum(W [rows, D], idx [n], off [B+1])`` (and
``segment_sum(V [n, D], off)``, the same with the rows given), then usually a
``stack`` of every table's [B, D] (the interaction's T = [x, e_0..e_{F-1}]).
After:  ``relax.call_tir`` of one hand-written PrimFunc, lookup and pooling fused:
    for b in 0..B-1:                       (CPU: serial; CUDA: one thread per (b, d))
        acc[0:D] = 0
        for p in off[b] .. off[b+1]-1:     data-dependent bounds, ragged and empty bags
            prefetch W[idx[min(p + PREFETCH, n-1)]]      (CPU only)
            acc[0:D] += float32(W[idx[p], 0:D])          (D vectorised)
        out[b, 0:D] = acc
On the CPU a ``cat`` along axis >= 1 (also ``stack``: core ATen's cat + view) that is not part of
a dot interaction (``targets.tvm.interaction`` fuses those whole) becomes one such kernel over all
its inputs, each input x_i viewed as [B, outer, w_i] (outer = the dims between 0
and the axis; reshapes are free) and written at column s_i = w_0 + ... + w_{i-1} of
out [B, outer, sum w]: a bag op's result is pooled straight into its columns (the bag's own call
becomes dead code), any other input is copied (vectorised); a ``view`` of the result re-emits
the kernel with the viewed shape.  TVM's own ``concat`` walks an ``if_then_else`` chain
over the inputs for every element: stacking 26 bags [2048, 16] took ~8 ms, 10x the lookups.
The ids are not checked here (``rewrite.runtime`` validates every batch first), as in ONNX's
Gather.  Measured: docs/lowering.md.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

PREFETCH = 8          # rows ahead; 26 tables of 2M rows, B=2048: 2.57 ms without, 2.42 with 8, 16 or 32
CUDA_THREADS = 256    # threads per block of the CUDA kernel
KERNEL_PREFIX = "bags_"


@dataclass(frozen=True)
class Segment:
    """One input of a CPU kernel: a bag op (``gather``: W, idx, off; else V, off) or a copy."""

    width: int            # columns of the output it fills (D for a bag)
    dtype: str            # the stored dtype of W / V / the copied tensor
    kind: str             # "gather", "rows" or "copy"


def cpu_kernel(segments: tuple[Segment, ...], outer: int, out_tail: tuple[int, ...], out_dtype: str):
    """PrimFunc(args of every segment..., out [B, *out_tail]) writing out viewed as
    [B, outer, sum width] (prod(out_tail) == outer * sum width); bags need outer == 1.
    The output has its final shape, so no reshape follows it (Relax turns a reshape that ends a
    dataflow block into a copy kernel)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            batch = T.int64()          # every offsets buffer is batch + 1 long (Relax's shapes)
            bufs = []
            for i, s in enumerate(segments):
                if s.kind == "copy":
                    bufs.append((T.match_buffer(T.arg(f"x{i}", T.handle()), (batch, outer, s.width), s.dtype),))
                    continue
                source = T.match_buffer(T.arg(f"w{i}", T.handle()), (T.int64(), s.width), s.dtype)
                ids = (T.match_buffer(T.arg(f"idx{i}", T.handle()), (T.int64(),), "int64"),) \
                    if s.kind == "gather" else ()
                bufs.append((source, *ids, T.match_buffer(T.arg(f"off{i}", T.handle()), (T.int64(),), "int64")))
            width = sum(s.width for s in segments)
            final = T.match_buffer(T.arg("out", T.handle()), (batch, *out_tail), out_dtype)
            out = T.decl_buffer((batch, outer, width), out_dtype, data=final.data)
            start = 0
            for s, args in zip(segments, bufs):          # one table at a time: its rows stream
                with T.serial(0, batch) as b, T.serial(0, outer) as o:
                    if s.kind == "copy":
                        _copy(T, args[0], out, b, o, start, s.width)
                    else:
                        _pool(T, args, out, b, start, s)
                start += s.width
    return ib.get()


def _copy(T, x, out, b, o, start: int, width: int) -> None:
    lanes = next((v for v in (16, 8, 4, 2, 1) if width % v == 0), 1)
    with T.serial(0, width // lanes) as jo, T.vectorized(0, lanes) as ji:
        T.buffer_store(out, x[b, o, jo * lanes + ji], [b, o, start + jo * lanes + ji])


def _pool(T, args, out, b, start: int, s: Segment) -> None:
    source, off = args[0], args[-1]
    acc = T.alloc_buffer((s.width,), "float32", scope="local")
    with T.vectorized(0, s.width) as d:
        T.buffer_store(acc, T.float32(0), [d])
    with T.serial(off[b], off[b + 1]) as p:
        if s.kind == "gather":
            idx = args[1]
            ahead = T.bind(idx[T.min(p + PREFETCH, idx.shape[0] - 1)])
            T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch", T.address_of(source[ahead, 0]),
                                          0, 3, 1))
            row = T.bind(idx[p])
        else:
            row = p
        with T.vectorized(0, s.width) as d:
            T.buffer_store(acc, acc[d] + T.cast(source[row, d], "float32"), [d])
    with T.vectorized(0, s.width) as d:
        T.buffer_store(out, acc[d], [b, 0, start + d])


def cuda_kernel(dim: int, dtype: str, gather: bool):
    """PrimFunc(W, idx, off, out) / (V, off, out) with one thread per output element (b, d).
    One definition for both: like ``cpu_kernel`` it is built with the IR builder, so ``gather``
    decides at build time whether there is an idx argument and the row is ``idx[p]`` or ``p``."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    threads = CUDA_THREADS

    def buffer(name: str, shape, buffer_dtype: str):      # named as the TVMScript version was
        return IRBuilder.name(name, T.match_buffer(T.arg(f"var_{name}", T.handle()), shape, buffer_dtype))

    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            b1 = IRBuilder.name("b1", T.int64())
            if gather:
                source = buffer("w", (IRBuilder.name("rows", T.int64()), dim), dtype)
                idx = buffer("idx", (IRBuilder.name("n", T.int64()),), "int64")
            else:
                source = buffer("v", (IRBuilder.name("n", T.int64()), dim), dtype)
            off = buffer("off", (b1,), "int64")
            out = buffer("out", (b1 - 1, dim), "float32")
            with T.thread_binding((b1 - 1) * dim // threads + 1, thread="blockIdx.x") as bx, \
                    T.thread_binding(threads, thread="threadIdx.x") as tx:
                with T.If(bx * threads + tx < (b1 - 1) * dim), T.Then():
                    acc = T.alloc_buffer((1,), "float32", scope="local")
                    b = IRBuilder.name("b", T.bind((bx * threads + tx) // dim))
                    d = IRBuilder.name("d", T.bind((bx * threads + tx) % dim))
                    T.buffer_store(acc, T.float32(0), [0])
                    with T.serial(off[b + 1] - off[b]) as p:
                        row = idx[off[b] + p] if gather else off[b] + p
                        T.buffer_store(acc, acc[0] + T.cast(source[row, d], "float32"), [0])
                    T.buffer_store(out, acc[0], [b, d])
    return ib.get()


def _kernel_var(bb, name: str, build):
    """The GlobalVar of kernel ``name`` in the module being built, adding it on first use."""
    gvar = next((g for g in bb.get().get_global_vars() if g.name_hint == name), None)
    return gvar if gvar is not None else bb.add_func(build(), name)


def _name(segments, outer: int, out_tail: tuple[int, ...]) -> str:
    """A kernel name per distinct (segments, outer, out_tail); long ones get a digest."""
    parts = "_".join(f"{s.kind}{s.width}{s.dtype}" for s in segments) + \
        f"_to{'x'.join(map(str, out_tail))}"
    if len(parts) > 64:
        parts = f"{len(segments)}inputs_" + hashlib.sha1(parts.encode()).hexdigest()[:12]
    return KERNEL_PREFIX + (f"o{outer}_" if outer != 1 else "") + parts


def emit_bag_op(imp, tensors: list, cuda: bool):
    """``call_tir`` of the kernel for ``tensors`` = [W, idx, off] or [V, off]  -> [B, D] f32."""
    from tvm import relax

    source, offsets = tensors[0], tensors[-1]
    dim, dtype = int(imp.shape_of(source)[1]), str(source.ty.dtype)
    batch = imp.shape_of(offsets)[0] - 1
    bb = imp.block_builder
    gather = len(tensors) == 3
    if cuda:
        gvar = _kernel_var(bb, f"{KERNEL_PREFIX}cuda_{'gather' if gather else 'rows'}{dim}{dtype}",
                           lambda: cuda_kernel(dim, dtype, gather))
        return bb.emit(relax.call_tir(gvar, tensors, relax.TensorType((batch, dim), "float32")))
    segments = (Segment(dim, dtype, "gather" if gather else "rows"),)
    gvar = _kernel_var(bb, _name(segments, 1, (dim,)), lambda: cpu_kernel(segments, 1, (dim,), "float32"))
    return bb.emit(relax.call_tir(gvar, tensors, relax.TensorType((batch, dim), "float32")))


def _kernel_call(bb, expr):
    """(segments, outer, args) when ``expr`` is bound to a CPU call of one of these kernels."""
    from tvm import relax

    call = bb.lookup_binding(expr) if isinstance(expr, relax.Var) else None
    if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.call_tir"
            and call.args[0].name_hint.startswith(KERNEL_PREFIX)
            and "cuda" not in call.args[0].name_hint):
        return None
    args = list(call.args[1])
    ndims = [len(a.ty.shape) for a in args]
    segments, outer, k = [], 1, 0
    while k < len(args):            # copy: [B, outer, w]; gather: W, idx, off; rows: V, off
        a = args[k]
        if ndims[k] == 3:
            segments.append(Segment(int(a.ty.shape[2]), str(a.ty.dtype), "copy"))
            outer, k = int(a.ty.shape[1]), k + 1
            continue
        gather = k + 2 < len(args) and ndims[k + 1] == ndims[k + 2] == 1
        segments.append(Segment(int(a.ty.shape[1]), str(a.ty.dtype), "gather" if gather else "rows"))
        k += 3 if gather else 2
    return tuple(segments), outer, args


def _bag_call(bb, expr):
    """(segment, args) when ``expr`` is the [B, D] result of ``emit_bag_op`` on the CPU, else None."""
    found = _kernel_call(bb, expr)
    if found is None or len(found[0]) != 1 or found[0][0].kind == "copy":
        return None
    return found[0][0], found[2]


def convert_view(node, imp, fallback) -> Any:
    """``view`` / ``reshape`` of a kernel's result (its only use) -> the kernel writing that shape
    directly; otherwise ``fallback(node)``, TVM's own converter.  (``stack`` decomposes to
    ``cat`` + ``view``; a reshape that ends a dataflow block would be a copy kernel.)"""
    from tvm import relax

    bb = imp.block_builder
    x = imp.env[node.args[0]]
    found = _kernel_call(bb, x) if len(node.args[0].users) == 1 else None
    shape = list(node.args[1]) if len(node.args) > 1 else []
    tail = shape[1:]
    if (found is None or not all(isinstance(d, int) and d > 0 for d in tail)
            or math.prod(tail) != math.prod(int(d) for d in list(imp.shape_of(x))[1:])):
        return fallback(node)
    segments, outer, args = found
    tail = tuple(tail)
    batch, dtype = imp.shape_of(x)[0], str(x.ty.dtype)
    gvar = _kernel_var(bb, _name(segments, outer, tail), lambda: cpu_kernel(segments, outer, tail, dtype))
    return bb.emit(relax.call_tir(gvar, args, relax.TensorType((batch, *tail), dtype)))


def _op(node, name: str) -> bool:
    return getattr(getattr(node, "target", None), "__name__", None) == name


def dot_interaction_part(node) -> bool:
    """Whether a ``cat`` node is the dot interaction's stack (cat -> view -> bmm) or its output
    ([x, pairs selected from the bmm]): those stay TVM concats, which
    ``targets.tvm.interaction`` then replaces, with the bmm and the selection, by one kernel
    reading the 27 vectors where they are (0.86 ms at B=2048 Kaggle, vs a stacking kernel here
    followed by TVM's generic bmm and take)."""
    if any(_op(u, "view.default") and any(_op(v, "bmm.default") for v in u.users) for u in node.users):
        return True
    return any(_op(x, "index_select.default") and _op(x.args[0], "view.default")
               and _op(x.args[0].args[0], "bmm.default") for x in node.args[0])


def convert_cat(node, imp) -> Any:
    """``cat(xs, dim)`` on the CPU -> one kernel (bags pooled in place, other inputs copied), or
    TVM's concat when the inputs do not fit it or the cat belongs to a dot interaction (see the
    module doc and ``dot_interaction_part``)."""
    import tvm
    from tvm import relax

    bb = imp.block_builder
    xs = [imp.env[x] for x in node.args[0]]
    if dot_interaction_part(node):
        return bb.emit(relax.op.concat(xs, axis=node.args[1] if len(node.args) > 1 else 0))
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shapes = [list(imp.shape_of(x)) for x in xs]
    dim %= len(shapes[0])
    bags = [_bag_call(bb, x) for x in xs]
    dtypes = {str(x.ty.dtype) for x in xs}
    equal = tvm.sym.Analyzer().can_prove_equal
    rest = [[int(d) for i, d in enumerate(s[1:], 1) if i != dim]
            if all(isinstance(d, tvm.tirx.IntImm) for d in s[1:]) else None for s in shapes]
    if (dim == 0 or len(xs) < 2 or len(dtypes) != 1 or len({len(s) for s in shapes}) != 1
            or None in rest or any(r != rest[0] for r in rest)
            or not all(equal(s[0], shapes[0][0]) for s in shapes)):
        return bb.emit(relax.op.concat(xs, axis=dim))
    batch, dtype = shapes[0][0], dtypes.pop()
    outer = math.prod(int(d) for d in shapes[0][1:dim])
    segments, args = [], []
    for x, s, bag in zip(xs, shapes, bags):
        if bag is not None and outer == 1:
            segments.append(bag[0])
            args += bag[1]
        else:
            width = math.prod(int(d) for d in s[dim:])
            segments.append(Segment(width, dtype, "copy"))
            args.append(bb.emit(relax.op.reshape(x, (batch, outer, width))))
    segments = tuple(segments)
    tail = [int(d) for d in shapes[0][1:]]
    tail[dim - 1] = sum(int(s[dim]) for s in shapes)
    tail = tuple(tail)
    gvar = _kernel_var(bb, _name(segments, outer, tail), lambda: cpu_kernel(segments, outer, tail, dtype))
    return bb.emit(relax.call_tir(gvar, args, relax.TensorType((batch, *tail), dtype)))
