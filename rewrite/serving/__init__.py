"""Serving a bundle under load (``rewrite serve`` / ``rewrite loadtest``), one concern per module:

protocol   the v2 (Open Inference) infer request/response, JSON and binary tensors
batching   merging canonical batches (feature-major, offsets rebased) and splitting answers
dispatch   the path per merged batch: fixed, by batch size, or load-aware (MP-Rec style)
scheduler  the request queue, dynamic batching, worker threads (one Predictor each)
metrics    Prometheus series and the per-minute log line
server     the Starlette app: routes, errors, limits; ``build`` loads and warms a bundle
listen     uvicorn on a bound socket; SIGTERM drains and exits 0; ``ServerThread`` for tests
workload   query-size distributions and request bodies from data files or synthetic ids
loadgen    the open-loop Poisson load generator, ``--find-max``, its JSON and plot
"""
