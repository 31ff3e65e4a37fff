"""TVM kernels for the embedding-bag ops of ``rewrite.bag_ops``: one TIR kernel per op call.

Before: ``dlrm_rewrite::gather_segment_sum(W [rows, D], idx [n], off [B+1])`` (and
``segment_sum(V [n, D], off)``, the same with the rows given).
After:  ``relax.call_tir`` of a hand-written PrimFunc, lookup and pooling fused:
    for b in 0..B-1:                       (CPU: serial; CUDA: one thread per (b, d))
        acc[0:D] = 0
        for p in off[b] .. off[b+1]-1:     data-dependent bounds, ragged and empty bags
            prefetch W[idx[min(p + PREFETCH, n-1)]]      (CPU only)
            acc[0:D] += float32(W[idx[p], 0:D])          (D vectorised)
        out[b, 0:D] = acc
The ids are not checked here (``rewrite.runtime`` validates every batch first), as in ONNX's
Gather.  Replaces TVM's import of the scatter-add form (a serial ``scatter_elements`` over an
[n, D] index plus a separate ``take``): 9.65 ms -> see docs/lowering.md at batch 2048.
"""

from __future__ import annotations

PREFETCH = 8          # rows ahead: covers ~340 ns of DRAM latency at ~40 ns per row (NOTES-stack.md)
CUDA_THREADS = 256    # threads per block of the CUDA kernel


def bag_kernel(dim: int, dtype: str, gather: bool, cuda: bool):
    """The PrimFunc ``(table_or_values, [indices,] offsets, out)`` for one (D, dtype)."""
    if cuda:
        return _cuda_kernel(dim, dtype, gather)
    return _cpu_kernel(dim, dtype, gather)


def _cpu_kernel(dim: int, dtype: str, gather: bool):
    from tvm.script import tirx as T

    if gather:
        @T.prim_func(private=True)
        def kernel(var_w: T.handle, var_idx: T.handle, var_off: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            rows, n, b1 = T.int64(), T.int64(), T.int64()
            w = T.match_buffer(var_w, (rows, dim), dtype)
            idx = T.match_buffer(var_idx, (n,), "int64")
            off = T.match_buffer(var_off, (b1,), "int64")
            out = T.match_buffer(var_out, (b1 - 1, dim), "float32")
            acc = T.alloc_buffer((dim,), "float32", scope="local")
            for b in T.serial(b1 - 1):
                for d in T.vectorized(dim):
                    acc[d] = T.float32(0)
                lo: T.let[T.int64] = off[b]
                for p in T.serial(off[b + 1] - lo):
                    ahead: T.let[T.int64] = idx[T.min(lo + p + PREFETCH, n - 1)]
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0",
                                                  T.address_of(w[ahead, 0]), 0, 3, 1))
                    row: T.let[T.int64] = idx[lo + p]
                    for d in T.vectorized(dim):
                        acc[d] = acc[d] + T.cast(w[row, d], "float32")
                for d in T.vectorized(dim):
                    out[b, d] = acc[d]
        return kernel

    @T.prim_func(private=True)
    def kernel(var_v: T.handle, var_off: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n, b1 = T.int64(), T.int64()
        v = T.match_buffer(var_v, (n, dim), dtype)
        off = T.match_buffer(var_off, (b1,), "int64")
        out = T.match_buffer(var_out, (b1 - 1, dim), "float32")
        acc = T.alloc_buffer((dim,), "float32", scope="local")
        for b in T.serial(b1 - 1):
            for d in T.vectorized(dim):
                acc[d] = T.float32(0)
            lo: T.let[T.int64] = off[b]
            for p in T.serial(off[b + 1] - lo):
                for d in T.vectorized(dim):
                    acc[d] = acc[d] + T.cast(v[lo + p, d], "float32")
            for d in T.vectorized(dim):
                out[b, d] = acc[d]
    return kernel


def _cuda_kernel(dim: int, dtype: str, gather: bool):
    from tvm.script import tirx as T

    threads = CUDA_THREADS

    if gather:
        @T.prim_func(private=True)
        def kernel(var_w: T.handle, var_idx: T.handle, var_off: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            rows, n, b1 = T.int64(), T.int64(), T.int64()
            w = T.match_buffer(var_w, (rows, dim), dtype)
            idx = T.match_buffer(var_idx, (n,), "int64")
            off = T.match_buffer(var_off, (b1,), "int64")
            out = T.match_buffer(var_out, (b1 - 1, dim), "float32")
            for bx in T.thread_binding((b1 - 1) * dim // threads + 1, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    if bx * threads + tx < (b1 - 1) * dim:
                        acc = T.alloc_buffer((1,), "float32", scope="local")
                        b: T.let[T.int64] = (bx * threads + tx) // dim
                        d: T.let[T.int64] = (bx * threads + tx) % dim
                        acc[0] = T.float32(0)
                        for p in T.serial(off[b + 1] - off[b]):
                            acc[0] = acc[0] + T.cast(w[idx[off[b] + p], d], "float32")
                        out[b, d] = acc[0]
        return kernel

    @T.prim_func(private=True)
    def kernel(var_v: T.handle, var_off: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n, b1 = T.int64(), T.int64()
        v = T.match_buffer(var_v, (n, dim), dtype)
        off = T.match_buffer(var_off, (b1,), "int64")
        out = T.match_buffer(var_out, (b1 - 1, dim), "float32")
        for bx in T.thread_binding((b1 - 1) * dim // threads + 1, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                if bx * threads + tx < (b1 - 1) * dim:
                    acc = T.alloc_buffer((1,), "float32", scope="local")
                    b: T.let[T.int64] = (bx * threads + tx) // dim
                    d: T.let[T.int64] = (bx * threads + tx) % dim
                    acc[0] = T.float32(0)
                    for p in T.serial(off[b + 1] - off[b]):
                        acc[0] = acc[0] + T.cast(v[off[b] + p, d], "float32")
                    out[b, d] = acc[0]
    return kernel


def emit_bag_op(imp, tensors: list, cuda: bool):
    """Emit ``call_tir`` of the kernel for ``tensors`` = [W, idx, off] or [V, off]; -> [B, D] f32."""
    from tvm import relax

    source, offsets = tensors[0], tensors[-1]
    rows_shape = imp.shape_of(source)
    dim = int(rows_shape[1])
    dtype = str(source.ty.dtype)
    gather = len(tensors) == 3
    name = f"{'gather_' if gather else ''}segment_sum_{dtype}_d{dim}{'_cuda' if cuda else ''}"
    bb = imp.block_builder
    mod = bb.get()
    gvar = next((g for g in mod.get_global_vars() if g.name_hint == name), None)
    if gvar is None:
        gvar = bb.add_func(bag_kernel(dim, dtype, gather, cuda), name)
    batch = imp.shape_of(offsets)[0] - 1
    return bb.emit(relax.call_tir(gvar, tensors, relax.TensorType((batch, dim), "float32")))
