"""The v2 gRPC service on a live server (127.0.0.1) against an unmodified ``tritonclient.grpc``."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from rewrite.runtime import load
from rewrite.serving.listen import ServerThread
from rewrite.serving.server import ServeConfig, build
from tests.serving.conftest import MODEL, N_DENSE, ROWS, ragged
from tests.tolerances import assert_close

MAX_BATCH = 64
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def client(bundle_dir):
    cfg = ServeConfig(MODEL, max_batch=MAX_BATCH, max_delay_s=0.002, max_request_bytes=MAX_BYTES,
                      grpc_address="127.0.0.1:0")
    app = build(bundle_dir, cfg, workers=2)
    with ServerThread(app):
        yield tg.InferenceServerClient(f"127.0.0.1:{app.grpc_port}")


@pytest.fixture(scope="module")
def reference(bundle_dir):
    return load(bundle_dir)


def inputs(dense, indices, offsets, index_type: str = "INT64"):
    out = [tg.InferInput("dense", list(dense.shape), "FP32"),
           tg.InferInput("indices", list(indices.shape), index_type),
           tg.InferInput("offsets", list(offsets.shape), "INT64")]
    out[0].set_data_from_numpy(dense)
    out[1].set_data_from_numpy(indices.astype(np.int32 if index_type == "INT32" else np.int64))
    out[2].set_data_from_numpy(offsets)
    return out


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]] == [
        ("dense", "FP32", [-1, N_DENSE]), ("indices", "INT64", [-1]), ("offsets", "INT64", [-1])]
    assert meta["outputs"][0]["name"] == "probabilities"
    assert client.get_server_metadata(as_json=True)["name"] == "dlrm-rewrite"


def test_predictions_equal_the_runtime(client, reference):
    for b, seed in ((1, 1), (7, 2), (MAX_BATCH, 3)):
        batch = ragged(b, seed)
        r = client.infer(MODEL, inputs(*batch), request_id=f"g{b}")
        path = r.get_response(as_json=True)["parameters"]["path"]["string_param"]
        assert r.get_response().id == f"g{b}"
        assert_close(r.as_numpy("probabilities"), reference.predict(*batch, path=path),
                     "probability-rebatched", path)


def test_largest_index_and_all_empty_bags(client, reference):
    dense, indices, offsets = ragged(4, seed=9)
    indices = indices.copy()
    indices[-1] = ROWS[-1] - 1                       # the last feature's largest row
    r = client.infer(MODEL, inputs(dense, indices, offsets))
    path = r.get_response(as_json=True)["parameters"]["path"]["string_param"]
    assert_close(r.as_numpy("probabilities"), reference.predict(dense, indices, offsets, path=path),
                 "probability-rebatched", path)
    empty = np.zeros(len(ROWS) * 4 + 1, dtype=np.int64)
    r = client.infer(MODEL, inputs(dense, np.zeros(0, np.int64), empty))
    assert r.as_numpy("probabilities").shape == (4,)


def test_concurrent_calls_each_get_their_own_answer(client, reference):
    batches = [ragged(1 + k % 5, seed=200 + k) for k in range(24)]
    done = []
    for b in batches:
        client.async_infer(MODEL, inputs(*b), callback=lambda result, error, b=b: done.append((b, result, error)))
    import time
    deadline = time.monotonic() + 60
    while len(done) < len(batches) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(done) == len(batches)
    for b, result, error in done:
        assert error is None
        path = result.get_response(as_json=True)["parameters"]["path"]["string_param"]
        assert_close(result.as_numpy("probabilities"), reference.predict(*b, path=path), "probability-rebatched", path)


@pytest.mark.parametrize("case, status, message", [
    ("int32 indices", "StatusCode.INVALID_ARGUMENT", "must be INT64"),
    ("id out of range", "StatusCode.INVALID_ARGUMENT", "outside its table's range"),
    ("too many samples", "StatusCode.INVALID_ARGUMENT", "exceed --max-batch"),
    ("unknown model", "StatusCode.NOT_FOUND", "unknown model"),
    ("too large", "StatusCode.RESOURCE_EXHAUSTED", ""),
])
def test_malformed_calls_get_a_status_and_the_server_stays_up(client, reference, case, status, message):
    dense, indices, offsets = ragged(3, seed=5)
    model, ins = MODEL, inputs(dense, indices, offsets)
    if case == "int32 indices":
        ins = inputs(dense, indices, offsets, "INT32")
    elif case == "id out of range":
        bad = indices.copy()
        bad[0] = ROWS[0]
        ins = inputs(dense, bad, offsets)
    elif case == "too many samples":
        ins = inputs(*ragged(MAX_BATCH + 1, seed=6))
    elif case == "unknown model":
        model = "nope"
    else:
        big = np.zeros((MAX_BYTES // 4 // N_DENSE + 1, N_DENSE), np.float32)
        ins = inputs(big, np.zeros(0, np.int64), np.zeros(len(ROWS) * big.shape[0] + 1, np.int64))
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, ins)
    assert e.value.status() == status and message in e.value.message()
    r = client.infer(MODEL, inputs(dense, indices, offsets))        # still serving
    assert r.as_numpy("probabilities").shape == (3,)
