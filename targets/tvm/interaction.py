"""tvm-llvm: the dot interaction as one kernel reading the n vectors where they are.

Before (Relax from the torch importer of ``DotInteraction``, t_0 = x, t_f [B, d] each):
    T = reshape(concat(t_0..t_{n-1}, axis=1), [B, n, d])
    z = concat(x, take(reshape(matmul(T, permute_dims(T)), [B, n*n]), flat_pairs, axis=1))
After:
    z = call_tir(dot_interaction, t_0..t_{n-1})           z [B, d + P]
    z[b, :d] = x[b];  z[b, d + o_r + c] = <t_i, t_{lo_r + c}> for each output run r = (i, lo_r, hi_r)

The kept pairs of every order ``rewrite.core.model.interaction_pairs`` knows are runs of consecutive
columns of one row of T Tᵀ, written out in row order; the runs are read off ``flat_pairs`` and
the rewrite is skipped if they are not.  Per sample the kernel transposes the n vectors into
Tt [d, n] (a stack buffer), then computes row i of T Tᵀ over only the columns its run needs as
sum_k t_i[k] * Tt[k, :] in 16-lane registers and stores the run: no [B, n*d] concat (TVM's
generic concat of 27 inputs took 8 ms at B = 2048), no [B, n, n] product in memory, no gather.
Kaggle shape (n = 27, d = 16), one thread: 0.86 ms at B = 2048 vs eager's 2.32 ms
(``benchmarks/tvm_stages.py``, docs/performance.md).
"""

from __future__ import annotations

import numpy as np

LANES = 16


def pair_runs(flat_pairs: np.ndarray, n: int) -> list[tuple[int, int, int]] | None:
    """flat indices i*n + j -> [(i, lo, hi)] with the columns lo..hi-1 of row i consecutive in the
    output, rows in output order; None when the indices are not such runs."""
    runs: list[tuple[int, int, int]] = []
    for f in (int(v) for v in flat_pairs):
        i, j = divmod(f, n)
        if not 0 <= i < n:
            return None
        if runs and runs[-1][0] == i and runs[-1][2] == j:
            runs[-1] = (i, runs[-1][1], j + 1)
        elif any(r[0] == i for r in runs):
            return None
        else:
            runs.append((i, j, j + 1))
    return runs


def interaction_source(n: int, d: int, runs: list[tuple[int, int, int]]) -> str:
    """TVMScript of the kernel (generated: one buffer argument per vector, one block per run)."""
    width = d + sum(hi - lo for _, lo, hi in runs)
    pad = -(-n // LANES) * LANES
    args = ", ".join(f"t{f}_h: T.handle" for f in range(n))
    lines = [
        "@T.prim_func(private=True)",
        f"def dot_interaction({args}, z_h: T.handle):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})',
        "    b = T.int64()",
        *(f'    t{f} = T.match_buffer(t{f}_h, (b, {d}), "float32")' for f in range(n)),
        f'    z = T.match_buffer(z_h, (b, {width}), "float32")',
        f'    tt = T.alloc_buffer(({d}, {pad}), "float32", scope="global")',
        f'    acc = T.alloc_buffer(({pad},), "float32", scope="global")',
        f"    for k, c in T.grid({d}, {pad}):",
        "        tt[k, c] = T.float32(0)",
        "    for s in range(b):",
        f"        for k in range({d}):",
        *(f"            tt[k, {f}] = t{f}[s, k]" for f in range(n)),
        f"        for k in T.vectorized({d}):",
        "            z[s, k] = t0[s, k]",
    ]
    out = d
    for i, lo, hi in runs:
        a, e = lo // LANES * LANES, -(-hi // LANES) * LANES
        lines += [
            f"        for c in T.vectorized({e - a}):",
            f"            acc[{a} + c] = T.float32(0)",
            f"        for k in T.unroll({d}):",
            f"            for c in T.vectorized({e - a}):",
            f"                acc[{a} + c] = acc[{a} + c] + t{i}[s, k] * tt[k, {a} + c]",
            f"        for c in T.vectorized({hi - lo}):",
            f"            z[s, {out} + c] = acc[{lo} + c]",
        ]
        out += hi - lo
    return "\n".join(lines) + "\n"


def interaction_kernel(n: int, d: int, runs: list[tuple[int, int, int]]):
    """PrimFunc ``(t_0 [B, d], ..., t_{n-1} [B, d]) -> z [B, d + P]`` (module docstring)."""
    import tvm.script
    from tvm.script import tirx as T

    return tvm.script.from_source(interaction_source(n, d, runs), extra_vars={"T": T})


def fuse_dot_interaction(mod):
    """Rewrite every dot interaction of ``main`` (module docstring) into one kernel call."""
    from tvm import relax, tirx
    from tvm.relax.dpl import is_const, is_op, is_tuple, rewrite_call, wildcard

    builder = relax.BlockBuilder(mod)
    vectors = wildcard()
    stacked = is_op("relax.reshape")(is_op("relax.concat")(vectors), wildcard())
    gram = is_op("relax.matmul")(stacked, is_op("relax.permute_dims")(stacked))
    pairs = is_const()
    kept = is_op("relax.take")(is_op("relax.reshape")(gram, wildcard()), pairs)
    pattern = is_op("relax.concat")(is_tuple([wildcard(), kept]))

    def rewrite(expr, match):
        parts, t = match[vectors], match[stacked]
        fields = list(parts.fields) if isinstance(parts, relax.Tuple) else None
        dims = list(t.ty.shape)
        head = expr.args[0].fields[0] if isinstance(expr.args[0], relax.Tuple) else None
        if (fields is None or head is None or not fields[0].same_as(head) or len(dims) != 3
                or not all(isinstance(s, tirx.IntImm) for s in dims[1:])):
            return expr
        n, d = int(dims[1]), int(dims[2])
        if (len(fields) != n or str(t.ty.dtype) != "float32" or int(expr.attrs.axis) != 1
                or any(len(f.ty.shape) != 2 or int(f.ty.shape[1]) != d for f in fields)):
            return expr
        runs = pair_runs(match[pairs].value.numpy().reshape(-1), n)
        if runs is None:
            return expr
        kernel = builder.add_func(interaction_kernel(n, d, runs), "dot_interaction")
        width = d + sum(hi - lo for _, lo, hi in runs)
        return relax.call_tir(kernel, fields, relax.TensorType([dims[0], width], "float32"))

    func = relax.analysis.remove_all_unused(rewrite_call(pattern, rewrite, mod["main"]))
    out = builder.get()
    out["main"] = func
    return out
