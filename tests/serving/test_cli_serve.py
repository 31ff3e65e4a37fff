"""`rewrite serve` as a real process (SIGTERM drains and exits 0), `rewrite loadtest`, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc
from click.testing import CliRunner

from rewrite.cli import main
from rewrite.serving.protocol import encode_request
from tests.serving.conftest import MODEL, ragged
from tests.serving.test_server import post

ROOT = Path(__file__).resolve().parents[2]


def strict_json(text: str):
    """json.loads refusing NaN / Infinity (issue 22 item 5)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def start(bundle_dir, *args):
    cmd = [sys.executable, "-c", "from rewrite.cli import main; main()", "serve", str(bundle_dir), "--port", "0",
           "--grpc-port", "0", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+) and grpc://(127\.0\.0\.1:\d+)", line)
        if m:
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            proc.grpc_url = m.group(2)
            return proc, m.group(1), lines
    proc.kill()
    pytest.fail("server did not start:\n" + "".join(lines))


def queued_samples(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return float(re.search(r"rewrite_queue_samples\{[^}]*\} (\S+)", text).group(1))


def test_sigterm_drains_in_flight_requests_and_exits_0(bundle_dir):
    # a long --max-delay keeps the requests queued until SIGTERM arrives
    proc, url, lines = start(bundle_dir, "--max-delay", "2s", "--queue-timeout", "30s", "--max-batch", "1024")
    try:
        batches = [ragged(b, seed=b) for b in (1, 2, 3)]
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(post, url, *encode_request(*b)) for b in batches]
            for _ in range(1000):
                if queued_samples(url) == 6:
                    break
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result(60) for f in futures]
        assert [s for s, _ in answers] == [200, 200, 200]
        assert proc.wait(60) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_bounded_load_run_has_no_errors(bundle_dir, tmp_path):
    proc, url, lines = start(bundle_dir, "--max-batch", "256")
    try:
        grpc = tritonclient.grpc.InferenceServerClient(proc.grpc_url)       # both transports up
        assert grpc.is_model_ready(MODEL)
        dense, indices, offsets = ragged(3, seed=4)
        ins = [tritonclient.grpc.InferInput(n, list(a.shape), t) for n, a, t in
               (("dense", dense, "FP32"), ("indices", indices, "INT64"), ("offsets", offsets, "INT64"))]
        for x, a in zip(ins, (dense, indices, offsets)):
            x.set_data_from_numpy(a)
        assert grpc.infer(MODEL, ins).as_numpy("probabilities").shape == (3,)
        out = tmp_path / "load.json"
        r = CliRunner().invoke(main, ["loadtest", url, "--qps", "40", "--duration", "1.5s", "--max-requests", "60",
                                      "--sizes", "lognormal:median=4,p99=64", "--max-batch", "256", "--pool", "32",
                                      "-o", str(out), "--json"])
        assert r.exit_code == 0, r.output
        result = strict_json(out.read_text())
        assert strict_json(r.stdout) == result                 # the same object, strict JSON both ways
        assert result["errors"] == 0 and result["ok"] == result["requests"] > 0
        assert result["model"] == MODEL and result["p99_ms"] > 0
        assert sum(p["samples"] for p in result["server_paths"]["paths"].values()) > 0
        # --find-max on a tiny budget: every step bounded, a plot written
        r = CliRunner().invoke(main, ["loadtest", url, "--find-max", "--p99-target", "200ms", "--start-qps", "20",
                                      "--duration", "0.5s", "--max-requests", "40", "--sizes", "fixed:2",
                                      "--pool", "16", "--plot", str(tmp_path / "p.png"), "--json"])
        assert r.exit_code == 0, r.output
        assert (tmp_path / "p.png").stat().st_size > 0
        assert strict_json(r.stdout)["points"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)


def test_a_port_in_use_is_refused_before_loading(bundle_dir):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = str(held.getsockname()[1])
        for args in (["--port", port, "--grpc-port", "0"], ["--port", "0", "--grpc-port", port]):
            r = CliRunner().invoke(main, ["serve", str(bundle_dir), *args])
            assert r.exit_code == 2 and "cannot bind" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("args, message", [
    (["serve", "/nonexistent/bundle"], "not a bundle directory"),
    (["serve", "{bundle}", "--max-delay", "soon"], "--max-delay"),
    (["serve", "{bundle}", "--p99-target", "-3ms"], "--p99-target"),
    (["serve", "{bundle}", "--path", "nope"], "--path 'nope'"),
    (["serve", "{bundle}", "--max-request-bytes", "lots"], "byte size"),
    (["loadtest", "localhost:1"], "expected http://"),
    (["loadtest", "http://127.0.0.1:9", "--sizes", "zipf"], "--sizes"),
    (["loadtest", "http://127.0.0.1:9", "--model-name", "m"], "http://127.0.0.1:9"),
])
def test_bad_input_is_one_line_and_exit_2(bundle_dir, args, message):
    args = [a.replace("{bundle}", str(bundle_dir)) for a in args]
    if args[0] == "serve":
        args += ["--port", "0", "--grpc-port", "0"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
