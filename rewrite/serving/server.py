"""``rewrite serve``: a bundle behind the Open Inference (KServe v2) HTTP protocol.

Starlette routes on uvicorn (uvloop + httptools); with ``ServeConfig.grpc_address`` the same
protocol over gRPC on the same event loop (``rewrite.serving.grpc_frontend``).  KServe's ``ModelServer`` was the first
choice; it is not used because kserve 0.15.2 pins protobuf < 5 and psutil < 6 (this project's
environment has protobuf 7 under onnx/onnxruntime and psutil 7 under TVM tuning), and pulls the
Kubernetes client and pandas: see docs/serving.md.  The protocol surface follows the spec:

    GET  /v2                                server metadata (extensions: binary_tensor_data)
    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models/{m}[/versions/{v}]      model metadata: inputs dense FP32 [-1, n_dense],
                                            indices INT64 [-1], offsets INT64 [-1]; output
                                            probabilities FP32 [-1]
    GET  /v2/models/{m}[/versions/{v}]/ready
    GET  /v2/models/{m}/config              Triton-style config (batching settings, paths)
    POST /v2/models/{m}[/versions/{v}]/infer   JSON or binary-tensor request / response
    GET  /v2/models/{m}/paths               per path: verified AUC, batches and share served
    POST /v2/repository/index               the one model (Triton's repository extension)
    GET  /metrics                           Prometheus text (rewrite.serving.metrics)

Errors are ``{"error": "..."}``: 400 malformed (protocol, shapes, offsets, ids, more samples
than ``max_batch``), 413 a body over ``max_request_bytes``, 404 an unknown model, 503 a request
that timed out in the queue or arrived during shutdown, 500 a failure inside ``predict``.
A successful answer's ``parameters`` name the path that computed it and its merged batch's size.
The event loop only parses and validates; ``predict`` runs on the scheduler's worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from dataclasses import dataclass
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rewrite.core.errors import RewriteError
from rewrite.runtime import check_batch
from rewrite.serving.metrics import CONTENT_TYPE_LATEST, Metrics
from rewrite.serving.protocol import HEADER_LENGTH, OUTPUT, ProtocolError, decode_infer, encode_infer
from rewrite.serving.scheduler import INLINE_BELOW_S, QueueTimeout, Scheduler, Unavailable


@dataclass
class ServeConfig:
    model_name: str
    max_batch: int = 2048
    max_delay_s: float = 0.0005
    queue_timeout_s: float = 1.0
    max_request_bytes: int = 16 << 20
    log_interval_s: float = 60.0
    batching: bool = True
    grpc_address: str | None = None       # "host:port" (port 0: a free one) serves gRPC too
    inline_below_s: float = INLINE_BELOW_S  # shorter batches compute on the event loop (scheduler)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class App:
    """The ASGI application around one bundle's scheduler (``self.asgi``)."""

    def __init__(self, bundle, scheduler: Scheduler, metrics: Metrics, cfg: ServeConfig):
        self.bundle, self.scheduler, self.metrics, self.cfg = bundle, scheduler, metrics, cfg
        self.rows, self.n_dense, self.ready = bundle.table_rows(), bundle.n_dense, False
        self.grpc_port: int | None = None         # bound at start-up when cfg.grpc_address is set
        for name, info in scheduler.policy.paths.items():
            if info.auc is not None:
                metrics.auc.labels(cfg.model_name, name).set(info.auc)
        m = "/v2/models/{model}"
        v = m + "/versions/{version}"
        self.asgi = Starlette(routes=[     # infer first: routes are matched in order, ~2.5 us each
            Route(m + "/infer", self.infer, methods=["POST"]), Route(v + "/infer", self.infer, methods=["POST"]),
            Route("/v2", self.server_metadata),
            Route("/v2/health/live", self.live),
            Route("/v2/health/ready", self.ready_check),
            Route(m, self.model_metadata), Route(v, self.model_metadata),
            Route(m + "/ready", self.model_ready), Route(v + "/ready", self.model_ready),
            Route(m + "/config", self.model_config),
            Route(m + "/paths", self.paths),
            Route("/v2/repository/index", self.index, methods=["POST"]),
            Route("/metrics", self.prometheus),
        ], lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.scheduler.start()
        logger = asyncio.get_running_loop().create_task(self._log_every())
        grpc_server = None
        if self.cfg.grpc_address is not None:
            from rewrite.serving import grpc_frontend

            grpc_server, self.grpc_port = await grpc_frontend.start(self, self.cfg.grpc_address)
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            if grpc_server is not None:           # stop taking calls; the ones in flight finish
                await grpc_server.stop(grace=self.cfg.queue_timeout_s + 5)
            await self.scheduler.close()          # uvicorn waited for open requests; drain the rest
            logger.cancel()
            self.metrics.log_window()

    async def _log_every(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.log_interval_s)
            self.metrics.log_window()

    # -- metadata -------------------------------------------------------------------------
    async def server_metadata(self, request: Request) -> Response:
        from importlib.metadata import version

        return JSONResponse({"name": "dlrm-rewrite", "version": version("dlrm-rewrite"),
                             "extensions": ["binary_tensor_data"]})

    async def index(self, request: Request) -> Response:
        return JSONResponse([{"name": self.cfg.model_name, "version": "1",
                              "state": "READY" if self.ready else "UNAVAILABLE"}])

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready_check(self, request: Request) -> Response:
        return Response(status_code=200 if self.ready else 503)

    def _model(self, request: Request) -> Response | None:
        name = request.path_params["model"]
        if name != self.cfg.model_name:
            return _error(404, f"unknown model {name!r} (this server serves {self.cfg.model_name!r})")
        version = request.path_params.get("version")
        if version not in (None, "1"):
            return _error(404, f"model {name!r} has no version {version!r} (versions: 1)")
        return None

    async def model_metadata(self, request: Request) -> Response:
        if (err := self._model(request)) is not None:
            return err
        return JSONResponse({
            "name": self.cfg.model_name, "versions": ["1"], "platform": "dlrm-rewrite",
            "inputs": [{"name": "dense", "datatype": "FP32", "shape": [-1, self.n_dense]},
                       {"name": "indices", "datatype": "INT64", "shape": [-1]},
                       {"name": "offsets", "datatype": "INT64", "shape": [-1]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1]}],
            "parameters": {"n_features": len(self.rows), "table_rows": self.rows,
                           "layout": "canonical: indices feature-major, offsets F*B+1 from 0"}})

    async def model_ready(self, request: Request) -> Response:
        if (err := self._model(request)) is not None:
            return err
        return Response(status_code=200 if self.ready else 503)

    async def model_config(self, request: Request) -> Response:
        if (err := self._model(request)) is not None:
            return err
        s = self.scheduler
        return JSONResponse({"name": self.cfg.model_name, "platform": "dlrm-rewrite", "max_batch_size": 0,
                             "dynamic_batching": {"max_batch_samples": s.max_batch,
                                                  "max_queue_delay_microseconds": int(1e6 * s.max_delay_s),
                                                  "default_queue_policy": {
                                                      "timeout_action": "REJECT",
                                                      "default_timeout_microseconds": int(1e6 * s.queue_timeout_s)}},
                             "dispatch": s.policy.report()["levels"], "policy": s.policy.name})

    async def paths(self, request: Request) -> Response:
        if (err := self._model(request)) is not None:
            return err
        return JSONResponse(self.scheduler.policy.report())

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    # -- inference ------------------------------------------------------------------------
    async def _body(self, request: Request) -> bytearray:
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ProtocolError(413, f"request body of {int(declared)} bytes exceeds --max-request-bytes {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(413, f"request body exceeds --max-request-bytes {limit}")
            chunks.append(chunk)
        return bytearray().join(chunks)        # writable: the tensors are views of it, handed to torch

    async def predict(self, dense: np.ndarray, indices: np.ndarray, offsets: np.ndarray):
        """One request through the scheduler, for every transport (HTTP, gRPC):
        ``(probabilities, info)``.  Every failure comes out as a ProtocolError: 400 invalid,
        503 timed out in the queue or shutting down, 500 a failure inside ``predict``."""
        b = dense.shape[0]
        if b > self.scheduler.max_batch:
            raise ProtocolError(400, f"{b} samples exceed --max-batch {self.scheduler.max_batch}; "
                                     f"split the request")
        try:
            batch = check_batch(dense, indices, offsets, self.n_dense, self.rows)
        except RewriteError as e:
            raise ProtocolError(400, str(e)) from None
        if b == 0:
            return np.zeros(0, dtype=np.float32), {}
        try:
            return await self.scheduler.submit(batch)
        except QueueTimeout as e:
            raise ProtocolError(503, str(e), "timeout") from None
        except Unavailable as e:
            raise ProtocolError(503, str(e), "unavailable") from None
        except Exception as e:                 # a failure inside predict: answer, stay up
            raise ProtocolError(500, f"inference failed: {type(e).__name__}: {e}", "error") from None

    async def infer(self, request: Request) -> Response:
        t0 = time.monotonic()
        if (err := self._model(request)) is not None:
            self.metrics.request("bad_request")
            return err
        try:
            req = decode_infer(await self._body(request), request.headers.get(HEADER_LENGTH))
            probs, info = await self.predict(req.dense, req.indices, req.offsets)
        except ProtocolError as e:
            self.metrics.request(e.outcome)
            return _error(e.status, str(e))
        extra = {"path": info["path"], "batch_samples": info["batch"]} if info else None
        body, headers = encode_infer(self.cfg.model_name, req.id, probs, req.binary_output, extra)
        self.metrics.request("ok", time.monotonic() - t0)
        return Response(body, headers=headers)


def build(bundle_dir, cfg: ServeConfig, policy_name: str = "load-aware", p99_target_s: float = 0.010,
          path: str | None = None, workers: int = 1, threads: int = 1, auc_data=None,
          auc_samples: int = 16384) -> App:
    """Load ``workers`` Predictors of the bundle, warm every path at every bucketed batch size
    up to ``cfg.max_batch`` (``rewrite.core.batch.bucket_sizes``), and wire the app.  With
    ``auc_data`` (a labelled data file), each path without an AUC in the manifest gets one
    measured here on the file's first ``auc_samples`` samples."""
    from rewrite.runtime import load
    from rewrite.serving.dispatch import BatchSize, Fixed, LoadAware, path_infos
    from rewrite.core.batch import bucket_sizes
    from rewrite.core.timing import serving_batches

    predictors = [load(bundle_dir, threads=threads, check_files=(i == 0)) for i in range(workers)]
    bundle = predictors[0].bundle
    infos = path_infos(bundle.manifest)
    if not infos:
        raise RewriteError(f"{bundle_dir}: no verified path to serve")
    if auc_data is not None:
        measure_auc(predictors[0], infos, auc_data, auc_samples)
    names = [p.name for p in infos]
    if path is not None:
        if path not in names:
            raise RewriteError(f"--path {path!r}: not a verified path of {bundle_dir} (paths: {', '.join(names)})")
        policy = Fixed(infos, path)
    elif policy_name == "batch-size":
        policy = BatchSize(infos, bundle)
    else:
        policy = LoadAware(infos, p99_target_s)
    used = [path] if path else names
    for pred in predictors:    # first calls load the runners, allocate and build per-size state
        for size in bucket_sizes(cfg.max_batch):      # (oneDNN: ~9 ms per new row count)
            for d, i, o in serving_batches(bundle.table_rows(), bundle.n_dense, size, 1, seed=0):
                for name in used:
                    pred.predict(d, i, o, path=name, validate=False)
    # start-up's objects (torch, onnxruntime, tvm, the loaded paths: ~200k) leave the collector's
    # view: a full collection over them stopped the event loop for 40-100 ms while serving
    gc.collect()
    gc.freeze()
    metrics = Metrics(cfg.model_name)
    sched = Scheduler(predictors, policy, metrics, bundle.n_features, cfg.max_batch, cfg.max_delay_s,
                      cfg.queue_timeout_s, cfg.batching, cfg.inline_below_s)
    return App(bundle, sched, metrics, cfg)


def measure_auc(pred, infos, data_path, samples: int) -> None:
    """Fill ``PathInfo.auc`` (where None) with each path's AUC on a labelled data file."""
    from rewrite import data
    from rewrite.core.metrics import auc

    ds = data.open(data_path)
    data.check_matches(ds, pred.bundle.n_dense, pred.bundle.n_features)
    if ds.labels is None:
        raise RewriteError(f"--data {data_path}: no labels, so no AUC")
    batches = list(ds.batches(4096, limit=samples))
    y = np.concatenate([b.labels.numpy() for b in batches])
    for info in infos:
        if info.auc is None:
            scores = [pred.predict(b.dense.numpy(), b.indices.numpy(), b.offsets.numpy(), path=info.name,
                                   validate=False) for b in batches]
            info.auc = float(auc(y, np.concatenate(scores)))
            info.auc_source = f"measured at start-up on {data_path} ({len(y)} samples)"
