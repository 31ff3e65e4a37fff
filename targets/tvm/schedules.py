"""Default CPU schedules for the tvm-llvm target (TVM 0.27 ships none for matmul on CPU).

Before: the legalised matmul PrimFunc, loops (..., i, j, k) with C[i, j] += A[i, k] * B[k, j],
which LLVM cannot vectorise (the k reduction is a serial dependency): ~0.5 GFLOP/s.
After: j split into SIMD lanes ji (16 fp32 = one AVX-512 register, else 8 or 4) and i into
blocks of ROWS rows, loops (..., io, jo, k, ii, ji) with ii unrolled and ji vectorised, so each
k step is ROWS broadcast-FMAs into ROWS vector accumulators; the init is split out
(``decompose_reduction``).  Measured on the demo's top MLP (2048 x 367 -> 64 -> 32 -> 1, one
thread): 122 ms -> ~3 ms (``benchmarks/tvm_stages.py``).  Functions without a static output
width divisible by 4 (e.g. the last 1-wide layer) keep the default.  On tvm-llvm the MLP layers
and the dot interaction never reach this rule: ``targets.tvm.dense`` and
``targets.tvm.interaction`` replace them first; it schedules the other matmuls (representations'
projections and contractions: MD, TT, DHE).
"""

from __future__ import annotations

ROWS = 4                     # rows per register block: 4 x (width / 16) accumulators
LANES = (16, 8, 4)           # fp32 elements per vector, widest first (AVX-512, AVX2, SSE/NEON)


def cpu_matmul_rule():
    """A dlight ScheduleRule for the legalised ``matmul`` block (fused epilogues untouched)."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    class CPUMatmul(dl.base.ScheduleRule):
        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc):
                return None
            sch = s_tir.Schedule(func)
            try:
                block = sch.get_sblock("matmul")
            except Exception:  # noqa: BLE001  (no such block: not a matmul)
                return None
            *outer, i, j, k = sch.get_loops(block)
            width = sch.get(j).extent
            if not isinstance(width, tirx.IntImm):
                return None
            lanes = next((v for v in LANES if int(width) % v == 0), None)
            if lanes is None:
                return None
            jo, ji = sch.split(j, factors=[None, lanes])
            io, ii = sch.split(i, factors=[None, ROWS])
            sch.reorder(*outer, io, jo, k, ii, ji)
            sch.unroll(ii)
            sch.vectorize(ji)
            sch.decompose_reduction(block, k)
            return sch

    return CPUMatmul()


def cpu_pipeline(target):
    """TVM's CPU pipeline with ``cpu_matmul_rule`` applied after legalisation and fusion."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    passes = (cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
              + [dl.ApplyDefaultSchedule(cpu_matmul_rule())]
              + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline
