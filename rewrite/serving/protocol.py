"""The Open Inference (KServe v2) protocol's infer request and response, JSON and binary tensors.

Request (``POST /v2/models/{name}/infer``)::

    {"id": "...", "inputs": [{"name": "dense", "datatype": "FP32", "shape": [B, n_dense], "data": [...]},
                             {"name": "indices", "datatype": "INT64", "shape": [N], ...},
                             {"name": "offsets", "datatype": "INT64", "shape": [F*B+1], ...}],
     "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}],   # optional
     "parameters": {"binary_data_output": true}}                                    # optional

Binary-tensor extension (what ``tritonclient.http`` sends by default): the body is the JSON
header, ``Inference-Header-Content-Length`` bytes long, followed by the raw little-endian tensor
bytes of each input whose ``parameters.binary_data_size`` is set, in input order.  The response
is binary when the request asked for it (``binary_data_output`` or the output's ``binary_data``),
else JSON with ``data`` as a flat list.  Errors: ``ProtocolError(status, message)``, which the
server turns into ``{"error": message}`` with that HTTP status.

``decode_infer`` checks the protocol (names, datatypes, shapes against the byte counts); the
model-level checks (F*B+1 offsets, monotone, ids in range) are ``rewrite.runtime.check_batch``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

HEADER_LENGTH = "inference-header-content-length"
OUTPUT = "probabilities"
DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "INT32": np.dtype("<i4"),
          "INT64": np.dtype("<i8"), "INT8": np.dtype("i1"), "UINT8": np.dtype("u1"),
          "INT16": np.dtype("<i2"), "FP16": np.dtype("<f2"), "BOOL": np.dtype("?")}
EXPECTED = {"dense": "FP32", "indices": "INT64", "offsets": "INT64"}


class ProtocolError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}`` (gRPC: the
    matching status code); ``outcome`` is its label in the request metrics."""

    def __init__(self, status: int, message: str, outcome: str | None = None):
        super().__init__(message)
        self.status = status
        self.outcome = outcome or ("too_large" if status == 413 else "bad_request")


@dataclass
class InferRequest:
    id: str | None
    dense: np.ndarray
    indices: np.ndarray
    offsets: np.ndarray
    binary_output: bool
    parameters: dict[str, Any] = field(default_factory=dict)


def _tensor(spec: dict[str, Any], raw: memoryview | None) -> np.ndarray:
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if datatype not in DTYPES:
        raise ProtocolError(400, f"input {name!r}: unsupported datatype {datatype!r}")
    if datatype != EXPECTED[name]:
        raise ProtocolError(400, f"input {name!r} must be {EXPECTED[name]}, got {datatype}")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape)):
        raise ProtocolError(400, f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    want = 2 if name == "dense" else 1
    if len(shape) != want:
        raise ProtocolError(400, f"input {name!r} must have {want} dimension(s), got shape {shape}")
    dtype = DTYPES[datatype]
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise ProtocolError(400, f"input {name!r}: {len(raw)} bytes of binary data for shape {shape} "
                                     f"of {datatype} ({count * dtype.itemsize} bytes)")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    data = spec.get("data")
    if data is None:
        raise ProtocolError(400, f"input {name!r} has neither data nor binary_data_size")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):     # ragged nesting
        arr = np.asarray([], dtype=object)
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and datatype == "INT64"):
        raise ProtocolError(400, f"input {name!r}: data is not a (nested) list of "
                                 f"{'integers' if datatype == 'INT64' else 'numbers'}")
    if arr.size != count:
        raise ProtocolError(400, f"input {name!r}: {arr.size} values for shape {shape} ({count})")
    return arr.astype(dtype).reshape(shape)


def collect_inputs(inputs: Iterable[tuple[Any, memoryview | None]]) -> dict[str, np.ndarray]:
    """(spec, raw bytes or None) per request input -> the three named arrays, checked: every
    name known, none twice, none missing (shared by the HTTP and the gRPC decoders)."""
    tensors: dict[str, np.ndarray] = {}
    for spec, raw in inputs:
        if not isinstance(spec, dict) or spec.get("name") not in EXPECTED:
            name = spec.get("name") if isinstance(spec, dict) else spec
            raise ProtocolError(400, f"unknown input {name!r} (inputs: dense, indices, offsets)")
        if spec["name"] in tensors:
            raise ProtocolError(400, f"input {spec['name']!r} given twice")
        tensors[spec["name"]] = _tensor(spec, raw)
    missing = [n for n in EXPECTED if n not in tensors]
    if missing:
        raise ProtocolError(400, f"missing input(s): {', '.join(missing)}")
    return tensors


def decode_infer(body: bytes | bytearray, header_length: str | None) -> InferRequest:
    """Body (+ the ``Inference-Header-Content-Length`` header if any) -> InferRequest, or ProtocolError."""
    view = memoryview(body)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(400, f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 < n <= len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {n} outside the body's {len(body)} bytes")
        head, rest = view[:n], view[n:]
    else:
        head, rest = view, view[len(body):]
    try:
        req = json.loads(bytes(head))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(400, "request header is not valid JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise ProtocolError(400, "request must be a JSON object with an 'inputs' list")
    pos = 0

    def with_raw(spec):
        nonlocal pos
        size = (spec.get("parameters") or {}).get("binary_data_size") if isinstance(spec, dict) else None
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or pos + size > len(rest):
                raise ProtocolError(400, f"input {spec.get('name')!r}: binary_data_size {size!r} runs past the body")
            raw, pos = rest[pos:pos + size], pos + size
        return spec, raw

    tensors = collect_inputs(with_raw(spec) for spec in req["inputs"])
    if pos != len(rest):
        raise ProtocolError(400, f"{len(rest) - pos} bytes of binary data not claimed by any input")
    params = req.get("parameters") or {}
    outputs = req.get("outputs") or []
    if not isinstance(params, dict) or not isinstance(outputs, list):
        raise ProtocolError(400, "'parameters' must be an object and 'outputs' a list")
    for o in outputs:
        if not isinstance(o, dict) or o.get("name") != OUTPUT:
            raise ProtocolError(400, f"unknown output {o.get('name') if isinstance(o, dict) else o!r} "
                                     f"(the model has {OUTPUT!r})")
    binary = bool(params.get("binary_data_output")) or any(
        (o.get("parameters") or {}).get("binary_data") for o in outputs)
    rid = req.get("id")
    return InferRequest(None if rid is None else str(rid), tensors["dense"], tensors["indices"],
                        tensors["offsets"], binary, params)


def encode_infer(model: str, request_id: str | None, probs: np.ndarray, binary: bool,
                 extra: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the response holding ``probs`` (FP32 [B])."""
    out: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": [int(probs.shape[0])]}
    head: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": [out]}
    if request_id is not None:
        head["id"] = request_id
    if extra:
        head["parameters"] = extra
    data = np.ascontiguousarray(probs, dtype="<f4")
    if binary:
        out["parameters"] = {"binary_data_size": data.nbytes}
        header = json.dumps(head, separators=(",", ":")).encode()
        return header + data.tobytes(), {"content-type": "application/octet-stream",
                                         "inference-header-content-length": str(len(header))}
    out["data"] = data.tolist()
    return json.dumps(head, separators=(",", ":")).encode(), {"content-type": "application/json"}


def encode_request(dense: np.ndarray, indices: np.ndarray, offsets: np.ndarray,
                   binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an infer request: what the load generator sends (tritonclient's layout)."""
    arrays = {"dense": np.ascontiguousarray(dense, "<f4"), "indices": np.ascontiguousarray(indices, "<i8"),
              "offsets": np.ascontiguousarray(offsets, "<i8")}
    inputs = []
    for name, a in arrays.items():
        spec: dict[str, Any] = {"name": name, "datatype": EXPECTED[name], "shape": list(a.shape)}
        if binary:
            spec["parameters"] = {"binary_data_size": a.nbytes}
        else:
            spec["data"] = a.reshape(-1).tolist()
        inputs.append(spec)
    head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": binary}}).encode()
    if not binary:
        return head, {"content-type": "application/json"}
    return head + b"".join(a.tobytes() for a in arrays.values()), {
        "content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}


def decode_response(body: bytes, header_length: str | None) -> np.ndarray:
    """The probabilities of an infer response (binary or JSON)."""
    n = int(header_length) if header_length is not None else len(body)
    head = json.loads(body[:n])
    out = head["outputs"][0]
    if n < len(body):
        return np.frombuffer(body[n:], dtype="<f4")
    return np.asarray(out["data"], dtype=np.float32)
