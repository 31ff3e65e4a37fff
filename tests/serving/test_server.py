"""A live server on 127.0.0.1 (in-process thread) against an unmodified tritonclient and raw HTTP."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from rewrite.runtime import load
from rewrite.serving.listen import ServerThread
from rewrite.serving.protocol import encode_request
from rewrite.serving.server import ServeConfig, build
from tests.serving.conftest import MODEL, N_DENSE, ROWS, ragged
from tests.tolerances import assert_close

MAX_BATCH = 64


@pytest.fixture(scope="module")
def server(bundle_dir):
    app = build(bundle_dir, ServeConfig(MODEL, max_batch=MAX_BATCH, max_delay_s=0.002, max_request_bytes=200_000),
                workers=2)
    with ServerThread(app) as url:
        yield url


@pytest.fixture(scope="module")
def reference(bundle_dir):
    return load(bundle_dir)


def inputs(batch, binary: bool):
    out = [th.InferInput("dense", list(batch[0].shape), "FP32"), th.InferInput("indices", list(batch[1].shape), "INT64"),
           th.InferInput("offsets", list(batch[2].shape), "INT64")]
    for x, a in zip(out, batch):
        x.set_data_from_numpy(a, binary_data=binary)
    return out


def check_answer(result, batch, reference):
    path = result.get_response()["parameters"]["path"]
    assert_close(result.as_numpy("probabilities"), reference.predict(*batch, path=path), "probability-rebatched", path)


def test_metadata_and_health(server):
    c = th.InferenceServerClient(server[len("http://"):])
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
    meta = c.get_model_metadata(MODEL)
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("dense", "FP32", [-1, N_DENSE]), ("indices", "INT64", [-1]), ("offsets", "INT64", [-1])]
    assert meta["outputs"][0]["name"] == "probabilities"
    assert c.get_server_metadata()["extensions"] == ["binary_tensor_data"]


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_predictions_equal_the_runtime(server, reference, binary):
    c = th.InferenceServerClient(server[len("http://"):])
    for b, seed in ((1, 1), (5, 2), (MAX_BATCH, 3)):
        batch = ragged(b, seed)
        r = c.infer(MODEL, inputs(batch, binary), request_id=f"r{b}",
                    outputs=[th.InferRequestedOutput("probabilities", binary_data=binary)])
        assert r.get_response()["id"] == f"r{b}"
        check_answer(r, batch, reference)


def test_concurrent_requests_each_get_their_own_answer(server, reference):
    batches = [ragged(1 + k % 7, seed=100 + k) for k in range(48)]
    c = th.InferenceServerClient(server[len("http://"):], concurrency=16)
    results = [c.async_infer(MODEL, inputs(b, True)) for b in batches]
    for b, r in zip(batches, results):
        check_answer(r.get_result(), b, reference)


def post(url: str, body: bytes, headers: dict | None = None):
    req = urllib.request.Request(f"{url}/v2/models/{MODEL}/infer", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _json(batch, **override):
    body = json.loads(encode_request(*batch, binary=False)[0])
    for spec in body["inputs"]:
        spec.update(override.get(spec["name"], {}))
    return json.dumps(body).encode()


GOOD = ragged(3, seed=7)
BAD_OFFSETS = GOOD[2].copy()
BAD_OFFSETS[2], BAD_OFFSETS[3] = BAD_OFFSETS[3] + 1, BAD_OFFSETS[2]
BAD_IDS = GOOD[1].copy()
BAD_IDS[-1] = ROWS[-1]
MALFORMED = {
    "dense wrong dtype": (400, _json(GOOD, dense={"datatype": "FP64"})),
    "indices wrong dtype": (400, _json(GOOD, indices={"datatype": "INT32"})),
    "dense wrong shape": (400, _json(GOOD, dense={"shape": [3, N_DENSE + 1],
                                                   "data": [0.0] * (3 * (N_DENSE + 1))})),
    "dense 1-D": (400, _json(GOOD, dense={"shape": [3 * N_DENSE]})),
    "data count != shape": (400, _json(GOOD, offsets={"shape": [len(GOOD[2]) + 1]})),
    "offsets not F*B+1": (400, _json(GOOD, offsets={"shape": [len(GOOD[2]) - 1], "data": GOOD[2][:-1].tolist()})),
    "offsets not monotone": (400, encode_request(GOOD[0], GOOD[1], BAD_OFFSETS)[0]),
    "id out of range": (400, encode_request(GOOD[0], BAD_IDS, GOOD[2])[0]),
    "negative id": (400, encode_request(GOOD[0], -1 - GOOD[1], GOOD[2])[0]),
    "float ids in JSON": (400, _json(GOOD, indices={"data": [0.5] * len(GOOD[1])})),
    "missing input": (400, json.dumps({"inputs": json.loads(_json(GOOD))["inputs"][:2]}).encode()),
    "unknown input": (400, _json(GOOD, offsets={"name": "lengths"})),
    "not JSON": (400, b"{not json"),
    "no inputs": (400, b"{}"),
    "more samples than --max-batch": (400, encode_request(*ragged(MAX_BATCH + 1, seed=9))[0]),
    "body over --max-request-bytes": (413, b"{" + b" " * 300_000 + b"}"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_v2_errors_and_the_server_stays_up(server, reference, case):
    status, body = MALFORMED[case]
    binary = case in ("offsets not monotone", "id out of range", "negative id", "more samples than --max-batch")
    headers = {}
    if binary:
        head_len = len(body) - sum(a.nbytes for a in (ragged(MAX_BATCH + 1, seed=9) if "max-batch" in case else GOOD))
        headers["Inference-Header-Content-Length"] = str(head_len)
    got, payload = post(server, body, headers)
    assert got == status, payload
    assert isinstance(json.loads(payload)["error"], str)
    c = th.InferenceServerClient(server[len("http://"):])
    check_answer(c.infer(MODEL, inputs(GOOD, True)), GOOD, reference)


def test_binary_size_that_runs_past_the_body(server):
    body, headers = encode_request(*GOOD)
    status, payload = post(server, body[:-4], headers)
    assert status == 400 and "binary" in json.loads(payload)["error"]


def test_unknown_model_is_404_through_tritonclient(server):
    c = th.InferenceServerClient(server[len("http://"):])
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.infer("nope", inputs(GOOD, True))


def test_metrics_are_prometheus_text(server):
    text = urllib.request.urlopen(f"{server}/metrics").read().decode()
    for series in ("rewrite_requests_total", "rewrite_queue_seconds_bucket", "rewrite_compute_seconds_bucket",
                   "rewrite_request_seconds_bucket", "rewrite_batch_samples_bucket", "rewrite_path_samples_total"):
        assert series in text
    assert 'outcome="bad_request"' in text and 'outcome="too_large"' in text


class Gate:
    """A real Predictor whose ``predict`` first waits for the test to open the gate."""

    def __init__(self, pred):
        self.pred, self.entered, self.open = pred, threading.Event(), threading.Event()

    def predict(self, *a, **k):
        self.entered.set()
        self.open.wait(30)
        return self.pred.predict(*a, **k)


class ThreadRecorder:
    """A real Predictor that records the name of the thread each ``predict`` ran on."""

    def __init__(self, pred):
        self.pred, self.threads = pred, []

    def predict(self, *a, **k):
        self.threads.append(threading.current_thread().name)
        return self.pred.predict(*a, **k)


@pytest.mark.parametrize("inline_below_s, on_worker", [(1.0, False), (0.0, True)])
def test_batches_estimated_below_the_inline_bound_compute_on_the_event_loop(bundle_dir, reference, inline_below_s,
                                                                            on_worker):
    app = build(bundle_dir, ServeConfig(MODEL, max_delay_s=0.0, inline_below_s=inline_below_s), workers=1)
    rec = ThreadRecorder(app.scheduler._idle[0])
    app.scheduler._idle[0] = rec
    batch = ragged(5, seed=31)
    with ServerThread(app) as url:
        c = th.InferenceServerClient(url[len("http://"):])
        check_answer(c.infer(MODEL, inputs(batch, True)), batch, reference)
    assert len(rec.threads) == 1 and rec.threads[0].startswith("rewrite-worker") == on_worker


def test_a_request_that_times_out_in_the_queue_gets_an_error(bundle_dir, reference):
    # inline_below_s=0: every batch to the worker thread, so the gated predict blocks only it
    app = build(bundle_dir, ServeConfig(MODEL, max_delay_s=0.0, queue_timeout_s=0.2, inline_below_s=0.0), workers=1)
    gate = Gate(app.scheduler._idle[0])
    app.scheduler._idle[0] = gate
    with ServerThread(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, *encode_request(*GOOD))
        assert gate.entered.wait(30)            # the only worker is busy with the first request
        status, payload = post(url, *encode_request(*GOOD))
        assert status == 503 and "queue" in json.loads(payload)["error"]
        gate.open.set()
        status, _ = first.result(30)
        assert status == 200                    # a started request is always answered


def test_requests_queued_behind_a_busy_worker_are_merged_into_one_batch(bundle_dir, reference):
    app = build(bundle_dir, ServeConfig(MODEL, max_delay_s=0.0, queue_timeout_s=30.0, inline_below_s=0.0),
                workers=1)
    gate = Gate(app.scheduler._idle[0])
    app.scheduler._idle[0] = gate
    batches = [ragged(b, seed=200 + b) for b in (2, 1, 5, 3)]
    with ServerThread(app) as url:
        c = th.InferenceServerClient(url[len("http://"):], concurrency=5)
        first = c.async_infer(MODEL, inputs(GOOD, True))
        assert gate.entered.wait(30)
        rest = [c.async_infer(MODEL, inputs(b, True)) for b in batches]
        for _ in range(3000):                   # until all four wait in the queue
            if app.scheduler.queued_samples == 11:
                break
            threading.Event().wait(0.01)
        gate.open.set()
        check_answer(first.get_result(), GOOD, reference)
        for b, r in zip(batches, rest):
            res = r.get_result()
            assert res.get_response()["parameters"]["batch_samples"] == 11
            check_answer(res, b, reference)
