"""Optional meta-schedule tuning of the tvm-llvm target (``--tune N``): fixed-batch variants.

Before: the dynamic-batch Relax module of ``targets.tvm.relax`` (batch B symbolic).  Its matmul
PrimFuncs have a symbolic row count, and meta-schedule can neither measure a task with a symbolic
shape nor look a static-shape record up for a symbolic PrimFunc (its database keys are
structurally equal PrimFuncs), so tuning schedules cannot be carried into the dynamic module.
After: for each tuned batch size b, a second library ``model_b<b>.so``: the same module with B
bound to b (``relax.transform.BindSymbolicVars``; lookup counts n_f stay symbolic), its matmul
tasks tuned by meta-schedule for N trials, compiled with the tuning database
(``MetaScheduleApplyDatabase``), every untuned function scheduled as in the untuned path
(``targets.tvm.schedules``).  The runner calls ``model_b<b>.so`` when a request has exactly b
samples and the dynamic library otherwise (no padding: a padded call would cost the larger
batch's time).

Which tasks are measured: only fused functions whose name contains "matmul" (the MLP layers,
``fused_matmul*_add*_relu*``, and the interaction's batched ``matmul``) and whose buffers all have
static shapes.  Gathers (``take``), segment sums (``scatter_elements``), ``cumsum`` and the
other lookup tasks are never handed to meta-schedule: its runner feeds random int64 inputs, i.e.
out-of-range row ids, and their shapes are symbolic in n_f anyway.

The speed-up recorded is measured in the same process right after the build: the tuned library
against the dynamic one at each tuned batch size, one thread, fresh serving batches, median.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rewrite.core.errors import RewriteError

DEFAULT_TUNE_BATCHES = (512, 2048)   # samples: the bundle's large latency sizes (compiler.py)
TRIALS_PER_ITER_MAX = 64             # meta-schedule's default candidates per search round
BUILD_TIMEOUT_S = 120                # per candidate; the default 30 s times out on 2 shared cores
RUN_TIMEOUT_S = 60
# Evolutionary search sized for small budgets on 2 cores (defaults: population 512, 50 unmeasured
# initial candidates, 4 genetic rounds, which cost minutes per round here).
SEARCH = {"population_size": 64, "init_min_unmeasured": 16, "genetic_num_iters": 2}
TUNE_EXTRA = ("xgboost", "cloudpickle", "psutil")   # meta-schedule's cost model and workers
TUNE_CORES = 1      # meta-schedule needs "num-cores"; 1 = serial schedules, as the bundle is timed
SPEEDUP_BATCHES, SPEEDUP_ROUNDS = 4, 3   # fresh batches x alternating rounds per tuned size


def tuned_library(batch: int) -> str:
    return f"model_b{batch}.so"


def check_options(options: dict[str, Any], target_name: str) -> tuple[int, tuple[int, ...]]:
    """(trials, batch sizes) from ``tune_trials`` / ``tune_batches``; RewriteError when bad."""
    trials = options.get("tune_trials")
    if "tune_batches" in options and not trials:
        raise RewriteError(f"{target_name}: option tune_batches needs tune_trials > 0")
    if trials is None:
        return 0, ()
    if missing := [m for m in TUNE_EXTRA if importlib.util.find_spec(m) is None]:
        raise RewriteError(f"{target_name}: tuning needs {', '.join(missing)} "
                           "(pip install 'dlrm-rewrite[tune]')")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise RewriteError(f"{target_name}: option tune_trials must be a positive integer, "
                           f"got {trials!r}")
    batches = options.get("tune_batches", DEFAULT_TUNE_BATCHES)
    if isinstance(batches, int):
        batches = (batches,)
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise RewriteError(f"{target_name}: option tune_batches must be positive batch sizes, "
                           f"got {batches!r}")
    return trials, tuple(sorted(set(batches)))


def static_batch(mod, batch: int):
    """``mod`` with main's batch symbol (dense's first extent) bound to ``batch``."""
    from tvm import relax

    sym = mod["main"].params[0].ty.shape[0]
    return relax.transform.BindSymbolicVars({sym: batch})(mod)


def fused(mod, target):
    """The module after library dispatch, legalisation and fusion (where tasks are extracted)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        return tvm.transform.Sequential(cpu.library_dispatch_passes(target)
                                        + cpu.legalize_passes(target))(mod)


def is_tunable(task) -> bool:
    """A matmul task with only static buffer shapes (see the module docstring)."""
    from tvm import tirx
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    if "matmul" not in task.task_name:
        return False
    try:                       # symbolic extents: "Cannot convert ... ir.Var ... to IntImm"
        args = ArgInfo.from_prim_func(task.dispatched[0]["main"])
    except TypeError:
        return False
    return all(isinstance(d, (int, tirx.IntImm)) for a in args for d in a.shape)


def tune(mod, target, trials: int, work_dir: Path) -> tuple[Any, list[str]]:
    """Meta-schedule the static-shape matmul tasks of ``mod`` (already batch-bound) for
    ``trials`` measured candidates in all -> (database, tuned task names)."""
    from tvm.s_tir import meta_schedule as ms

    tasks = [t for t in ms.relax_integration.extract_tasks(fused(mod, target), target)
             if is_tunable(t)]
    if not tasks:
        raise RewriteError("tvm-llvm: tuning found no static-shape matmul task in the model")
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, str(work_dir), num_threads=1, seed=0,
        strategy=ms.search_strategy.EvolutionarySearch(**SEARCH))
    per_iter = max(1, min(TRIALS_PER_ITER_MAX, trials // len(tasks)))
    quiet = logging.getLogger("tvm.s_tir.meta_schedule")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):     # per-round task tables
            database = ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                max_trials_global=trials, num_trials_per_iter=per_iter,
                builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT_S),
                runner=ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S),
                cost_model="xgb")
    finally:
        quiet.setLevel(level)
    return database, [t.task_name for t in tasks]


def build_with(mod, target, database):
    """Compile ``mod`` with the tuned schedules of ``database``; the rest as the untuned path."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    from targets.tvm.schedules import cpu_matmul_rule

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(m, _ctx):
        with target, database:
            passes = (cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
                      + [relax.transform.MetaScheduleApplyDatabase(),
                         dl.ApplyDefaultSchedule(cpu_matmul_rule())]
                      + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return tvm.transform.Sequential(passes)(m)

    return tvm.compile(mod, target, relax_pipeline=pipeline)


def tune_batches(mod, target, trials: int, batches: tuple[int, ...], out_dir: Path,
                 write) -> dict[str, Any]:
    """Tune and build one library per batch size (``write(executable, name)`` saves it).

    ``target`` gets num-cores = TUNE_CORES (meta-schedule refuses a target without it).
    Returns the options to record: trials, batches, seconds, the tuned task names.
    """
    import tvm

    t0 = time.perf_counter()
    target = tvm.target.Target({**target.export(), "num-cores": TUNE_CORES})
    tasks: dict[str, list[str]] = {}
    for b in batches:
        static = static_batch(mod, b)
        with tempfile.TemporaryDirectory(prefix="tvm-tune-") as work:
            database, names = tune(static, target, trials, Path(work))
            write(build_with(static, target, database), tuned_library(b))
        tasks[str(b)] = names
    return {"tune_trials": trials, "tune_batches": list(batches),
            "tune_seconds": round(time.perf_counter() - t0, 1), "tuned_tasks": tasks,
            "tuned_libraries": {str(b): tuned_library(b) for b in batches}}


def measure_speedup(untuned, tuned, rows: list[int], n_dense: int, n_features: int,
                    batches: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """{batch: {untuned_ms, tuned_ms, speedup}}: median ms per call, the two runners alternating."""
    from rewrite.core.timing import serving_batches, time_calls
    from rewrite.core.batch import split_bags_np

    out = {}
    for b in batches:
        inputs = [(d, split_bags_np(i, o, n_features))
                  for d, i, o in serving_batches(rows, n_dense, b, SPEEDUP_BATCHES, seed=7)]
        times: dict[str, list[float]] = {"untuned": [], "tuned": []}
        for run in (untuned, tuned):
            run(*inputs[0])                               # warm-up
        for _ in range(SPEEDUP_ROUNDS):
            for key, run in (("untuned", untuned), ("tuned", tuned)):
                times[key] += time_calls(lambda x, r=run: r(*x), inputs)
        ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        out[str(b)] = {"untuned_ms": round(ms["untuned"], 3), "tuned_ms": round(ms["tuned"], 3),
                       "speedup": round(ms["untuned"] / ms["tuned"], 3)}
    return out
