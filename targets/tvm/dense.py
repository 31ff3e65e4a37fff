"""tvm-llvm: every MLP Linear layer as one register-blocked kernel over a weight packed at compile time.

Before (Relax from the torch importer, W a parameter [N, K], b a parameter [N]):
    y = relu?(add(b, matmul(x, permute_dims(W))))          x [B, K], B symbolic
After:
    y = call_tir(dense_K_N[_relu], x, Wp, b)                Wp a constant [N / TILE, K, TILE]
    Wp[p, k, c] = W[p * TILE + c, k]                        (W is dropped from the parameters)

The kernel computes ROWS x TILE output blocks (TILE = 2 x 16 fp32 lanes, one AVX-512 register
each) with the accumulators in registers: per k step 2 weight loads, ROWS broadcasts and 2 x ROWS
FMAs, reading the packed panel Wp[p] contiguously; the accumulators start at b and the ReLU is
applied on the way out.  The B mod ROWS rows left over (all of them at B = 1) take a one-row loop,
so no block carries a bounds predicate.  Accumulators are a "global"-scope buffer of fewer than
1,024 bytes, which TVM places on the stack (``LowerTVMBuiltin``: a "local" buffer becomes a heap
workspace, and LLVM then stores every accumulator on every k step: half the speed).
Measured, one thread: one 512 x 256 layer at B = 2048 ran 3.0 ms vs torch's MKL 3.4 ms (a
standalone script, alternating with torch), where the schedule of ``targets.tvm.schedules`` ran
9.1 ms plus a transpose per call; the Kaggle MLPs in ``benchmarks/tvm_stages.py``:
docs/performance.md.
Layers whose N is not a multiple of 16 (the last 1-wide layer) keep that schedule.  The kernel
is written for 16-lane registers; on an AVX2 host LLVM splits each into two (correct, not measured).
"""

from __future__ import annotations

import numpy as np

LANES = 16                    # fp32 per AVX-512 register
STACK_BYTES = 1024            # TVM's kMaxStackAlloca: smaller "global" buffers live on the stack


def kernel_shape(n: int) -> tuple[int, int] | None:
    """(rows, tile) of the register block for output width n, or None if n does not fit."""
    if n % LANES:
        return None
    tile = 2 * LANES if n % (2 * LANES) == 0 else LANES
    rows = min(14, (STACK_BYTES - 1) // (4 * tile))     # 7 x 32 or 14 x 16 accumulators
    return rows, tile


def pack_weight(weight: np.ndarray, tile: int) -> np.ndarray:
    """W [N, K] -> Wp [N / tile, K, tile] with Wp[p, k, c] = W[p * tile + c, k]."""
    n, k = weight.shape
    return np.ascontiguousarray(weight.reshape(n // tile, tile, k).transpose(0, 2, 1))


def dense_kernel(k_dim: int, n_dim: int, relu: bool):
    """PrimFunc ``(x [B, K], Wp, b [N]) -> y [B, N]``, y = relu?(x Wᵀ + b), B symbolic."""
    from tvm.script import tirx as T

    rows, tile = kernel_shape(n_dim)
    vecs, panels = tile // LANES, n_dim // tile
    floor = 0.0 if relu else float("-inf")     # max(v, -inf) = v: one kernel for both

    @T.prim_func(private=True)
    def dense(x_h: T.handle, w: T.Buffer((panels, k_dim, tile), "float32"),
              bias: T.Buffer((n_dim,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        b = T.int64()
        x = T.match_buffer(x_h, (b, k_dim), "float32")
        y = T.match_buffer(y_h, (b, n_dim), "float32")
        acc = T.alloc_buffer((rows, tile), "float32", scope="global")
        one = T.alloc_buffer((tile,), "float32", scope="global")
        for io, p in T.grid(b // rows, panels):
            for r in T.unroll(rows):
                for v in T.unroll(vecs):
                    for c in T.vectorized(LANES):
                        acc[r, v * LANES + c] = bias[p * tile + v * LANES + c]
            for k in range(k_dim):
                for r in T.unroll(rows):
                    for v in T.unroll(vecs):
                        for c in T.vectorized(LANES):
                            acc[r, v * LANES + c] = (acc[r, v * LANES + c]
                                                     + x[io * rows + r, k] * w[p, k, v * LANES + c])
            for r in T.unroll(rows):
                for v in T.unroll(vecs):
                    for c in T.vectorized(LANES):
                        y[io * rows + r, p * tile + v * LANES + c] = T.max(
                            acc[r, v * LANES + c], T.float32(floor))
        for i in range(b // rows * rows, b):
            for p in range(panels):
                for v in T.unroll(vecs):
                    for c in T.vectorized(LANES):
                        one[v * LANES + c] = bias[p * tile + v * LANES + c]
                for k in range(k_dim):
                    for v in T.unroll(vecs):
                        for c in T.vectorized(LANES):
                            one[v * LANES + c] = one[v * LANES + c] + x[i, k] * w[p, k, v * LANES + c]
                for v in T.unroll(vecs):
                    for c in T.vectorized(LANES):
                        y[i, p * tile + v * LANES + c] = T.max(one[v * LANES + c], T.float32(floor))

    return dense.with_attr("tirx.is_scheduled", True)


def pack_dense_layers(mod, params: list, names: list[str]):
    """Rewrite every matched Linear of ``main`` (module docstring) into the packed kernel.

    Returns (module, remaining params, their names): the packed weights become constants of the
    module and leave the runtime inputs; every other parameter (tables, biases) stays an input.
    """
    import torch
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    func = mod["main"]
    n_inputs = int(func.attrs["num_input"])
    values = {p: params[i] for i, p in enumerate(func.params[n_inputs:])}
    builder = relax.BlockBuilder(mod)
    kernels: dict[tuple[int, int, bool], object] = {}

    x, weight, bias = wildcard(), wildcard(), wildcard()
    matmul = is_op("relax.matmul")(x, is_op("relax.permute_dims")(weight))
    linear = is_op("relax.add")(bias, matmul) | is_op("relax.add")(matmul, bias)

    def rewriter(relu: bool):
        def rewrite(expr, match):
            w, b = match[weight], match[bias]
            if w not in values or b not in values or len(w.ty.shape) != 2:
                return expr
            n, k = (int(d) for d in w.ty.shape)
            shape = kernel_shape(n)
            if shape is None or tuple(int(d) for d in b.ty.shape) != (n,) or str(w.ty.dtype) != "float32":
                return expr
            key = (k, n, relu)
            if key not in kernels:
                kernels[key] = builder.add_func(dense_kernel(k, n, relu),
                                                f"dense_{k}_{n}{'_relu' if relu else ''}")
            packed = pack_weight(torch.from_dlpack(values[w]).numpy(), shape[1])
            return relax.call_tir(kernels[key], [match[x], relax.const(packed), b],
                                  relax.TensorType([match[x].ty.shape[0], n], "float32"))
        return rewrite

    func = rewrite_call(is_op("relax.nn.relu")(linear), rewriter(True), func)
    func = rewrite_call(linear, rewriter(False), func)
    func = relax.analysis.remove_all_unused(func)
    used = relax.analysis.free_vars(func.body)
    keep = [p for p in func.params[n_inputs:] if p in used]
    func = relax.Function(list(func.params[:n_inputs]) + keep, func.body, func.ret_ty,
                          func.is_pure, func.attrs, func.span)
    out = builder.get()
    out["main"] = func
    kept = {p.name for p in keep}
    pairs = [(t, n) for t, n in zip(params, names) if n in kept]
    out = tvm.relax.transform.DeadCodeElimination(["main"])(out)
    return out, [t for t, _ in pairs], [n for _, n in pairs]
