"""The Open Inference (KServe v2) protocol over gRPC: Triton's ``GRPCInferenceService``.

The service definition and its generated stubs come from ``tritonclient[grpc]`` (the same
``grpc_service.proto`` that Triton and KServe serve), run by ``grpc.aio`` on the HTTP server's
event loop, so both transports share one scheduler, one set of metrics and one validation path
(``App.predict``).  Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelInfer (tensors as ``raw_input_contents``, what ``tritonclient.grpc`` sends,
or as typed ``contents``); the output is always ``raw_output_contents``.  The other RPCs of the
service (shared memory, repository control, statistics, tracing) answer UNIMPLEMENTED.

Errors are gRPC statuses with the HTTP server's messages: INVALID_ARGUMENT (400), NOT_FOUND
(unknown model or version), RESOURCE_EXHAUSTED (a message over ``--max-request-bytes``, refused
by gRPC itself), UNAVAILABLE (queue timeout, shutdown), INTERNAL (a failure inside predict).
"""

from __future__ import annotations

import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from rewrite.serving.protocol import EXPECTED, OUTPUT, ProtocolError, collect_inputs

STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL,
          503: grpc.StatusCode.UNAVAILABLE}
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "INT8": "int_contents", "INT16": "int_contents",
            "UINT8": "uint_contents", "BOOL": "bool_contents"}


def decode(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """A ModelInferRequest's inputs -> the three arrays (the HTTP decoder's checks)."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise ProtocolError(400, f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs")

    def spec_and_raw(i: int, t) -> tuple[dict, memoryview | None]:
        spec = {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}
        if raws:                      # writable (a copy): the arrays are handed to torch
            return spec, memoryview(bytearray(raws[i]))
        field = CONTENTS.get(t.datatype)
        spec["data"] = list(getattr(t.contents, field)) if field else None
        return spec, None

    return collect_inputs(spec_and_raw(i, t) for i, t in enumerate(request.inputs))


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The v2 gRPC service around ``App`` (rewrite.serving.server)."""

    def __init__(self, app):
        self.app = app

    async def _model(self, name: str, version: str, context) -> None:
        served = self.app.cfg.model_name
        if name != served:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown model {name!r} (this server serves {served!r})")
        if version not in ("", "1"):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {name!r} has no version {version!r} (versions: 1)")

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.app.ready)

    async def ModelReady(self, request, context):
        await self._model(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self.app.ready)

    async def ServerMetadata(self, request, context):
        from importlib.metadata import version

        return pb.ServerMetadataResponse(name="dlrm-rewrite", version=version("dlrm-rewrite"))

    async def ModelMetadata(self, request, context):
        await self._model(request.name, request.version, context)
        meta = pb.ModelMetadataResponse.TensorMetadata
        shapes = {"dense": [-1, self.app.n_dense], "indices": [-1], "offsets": [-1]}
        return pb.ModelMetadataResponse(
            name=self.app.cfg.model_name, versions=["1"], platform="dlrm-rewrite",
            inputs=[meta(name=n, datatype=EXPECTED[n], shape=shapes[n]) for n in EXPECTED],
            outputs=[meta(name=OUTPUT, datatype="FP32", shape=[-1])])

    async def ModelInfer(self, request, context):
        t0 = time.monotonic()
        app = self.app
        if request.model_name != app.cfg.model_name or request.model_version not in ("", "1"):
            app.metrics.request("bad_request")
            await self._model(request.model_name, request.model_version, context)
        try:
            for o in request.outputs:
                if o.name != OUTPUT:
                    raise ProtocolError(400, f"unknown output {o.name!r} (the model has {OUTPUT!r})")
            arrays = decode(request)
            probs, info = await app.predict(arrays["dense"], arrays["indices"], arrays["offsets"])
        except ProtocolError as e:
            app.metrics.request(e.outcome)
            await context.abort(STATUS[e.status], str(e))
        out = pb.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype="FP32", shape=[int(probs.shape[0])])
        response = pb.ModelInferResponse(model_name=app.cfg.model_name, model_version="1", id=request.id,
                                         outputs=[out],
                                         raw_output_contents=[np.ascontiguousarray(probs, "<f4").tobytes()])
        if info:
            response.parameters["path"].string_param = info["path"]
            response.parameters["batch_samples"].int64_param = int(info["batch"])
        app.metrics.request("ok", time.monotonic() - t0)
        return response


async def start(app, address: str) -> tuple[grpc.aio.Server, int]:
    """Serve ``app`` over gRPC at ``host:port`` (port 0: a free one) on the running event loop;
    returns the server and its port."""
    limit = app.cfg.max_request_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", max(limit, 64 << 20)),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(app), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"gRPC: cannot bind {address}")
    await server.start()
    return server, port
