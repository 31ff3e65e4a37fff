"""The cost model, in the shape of TorchRec's planner: plain data and small steps.

    types       HardwareSpec (memory tiers, GEMM throughput, overheads), Variant, Cost, Footprint
    hardware    presets with sources, user JSON specs, cpu-local measured by microbench
    estimate    bytes per tier and seconds per batch, read off each representation's own graph
    calibrate   fit the estimator's constants to timings on this machine (stored, reused)
    variants    enumerate (pass setting x tier) per table; measured quality per variant
    solve       one variant per table: an ILP (scipy.optimize.milp) under memory/quality/latency
    select      measure the chosen plan's AUC as a whole and revise; diagnose; explain
    dispatch    per batch-size path switching (MP-Rec); plan, planner: the plan JSON and the loop
    pareto      memory vs latency vs AUC frontier
"""
