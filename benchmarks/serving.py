"""Serving under load (issue 19's goals) on one bundle: JSON + a latency-vs-load plot.

    PYTHONPATH=. python benchmarks/serving.py BUNDLE --data day_1.npz [--p99-target 10ms] \
        [--step 3] [-o benchmarks/results/serving.json]

Each contender is a fresh `rewrite serve` subprocess on 127.0.0.1 (1 worker, 1 intra-op thread);
the load generator runs in this process (open loop, Poisson, rewrite.serving.loadgen) and shares
the machine's cores with it, as a sidecar client would.  Contenders run one after another in the
same invocation, and the figures compared are ratios within it.

1. max QPS at p99 <= target, MLPerf DLRM query sizes (100-700 samples), data-file samples
   (served AUC from the answers): load-aware multi-path vs every single path (`--path`);
2. max QPS at the target, small-query mix (lognormal median 2, p99 64): dynamic batching vs
   `--no-batching`, both on the same single path;
3. batch-1 overhead: p50 of sequential requests through the server (keep-alive HTTP, binary
   tensors) vs in-process `predict` on the same path, alternating rounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewrite.core.isa import cpu_model  # noqa: E402
from rewrite.serving import loadgen  # noqa: E402
from rewrite.serving.protocol import encode_request  # noqa: E402
from rewrite.serving.workload import RequestPool, parse_sizes  # noqa: E402


class Server:
    def __init__(self, bundle: Path, *args: str):
        cmd = [sys.executable, "-c", "from rewrite.cli import main; main()", "serve", str(bundle), "--port", "0",
               "--model-name", "m", "--log-interval", "3600s", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                     stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            m = re.search(r"serving m on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                return
        raise RuntimeError(f"server did not start: {' '.join(cmd)}")

    def paths(self) -> dict:
        from urllib.request import urlopen

        return json.loads(urlopen(f"{self.url}/v2/models/m/paths").read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def find_max(bundle, args, pool, target_ms, label, extra):
    srv = Server(bundle, "--max-batch", str(args.max_batch), "--p99-target", f"{target_ms}ms", *extra)
    try:
        log = lambda p: print(f"  [{label}] {p['offered_qps']:8.1f} q/s: p99 {p['p99_ms'] or -1:8.2f} ms, "  # noqa: E731
                              f"errors {p['errors']}, {'pass' if p['passed'] else 'FAIL'}", file=sys.stderr)
        r = loadgen.find_max(srv.url, "m", pool, target_ms, args.start_qps, args.step, refine=args.refine,
                             timeout_s=5.0, log=log)
        r["server_paths"] = srv.paths()
        return r
    finally:
        srv.stop()


def overhead(bundle, path: str, rounds: int, calls: int) -> dict:
    from rewrite.runtime import load
    from rewrite.core.timing import serving_batches

    pred = load(bundle, threads=1)
    b = pred.bundle
    batches = serving_batches(b.table_rows(), b.n_dense, 1, 64, seed=5)
    srv = Server(bundle, "--path", path, "--max-delay", "0")
    host, port = srv.url[len("http://"):].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port))
    bodies = [encode_request(*x) for x in batches]
    local, remote = [], []
    try:
        for _ in range(rounds):
            for k in range(calls):
                x = batches[k % len(batches)]
                t0 = time.perf_counter()
                pred.predict(*x, path=path)
                local.append(time.perf_counter() - t0)
            for k in range(calls):
                body, headers = bodies[k % len(bodies)]
                t0 = time.perf_counter()
                conn.request("POST", "/v2/models/m/infer", body, headers)
                resp = conn.getresponse()
                resp.read()
                remote.append(time.perf_counter() - t0)
                assert resp.status == 200
    finally:
        conn.close()
        srv.stop()
    lp, rp = 1e3 * float(np.median(local)), 1e3 * float(np.median(remote))
    return {"path": path, "in_process_p50_ms": lp, "server_p50_ms": rp, "bound_ms": 2 * lp + 0.1,
            "met": rp <= 2 * lp + 0.1, "calls": rounds * calls}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, help="labelled data for samples and the served AUC")
    ap.add_argument("--p99-target", type=float, default=10.0, help="ms")
    ap.add_argument("--max-batch", type=int, default=2048)
    ap.add_argument("--step", type=float, default=3.0, help="seconds per load step")
    ap.add_argument("--refine", type=int, default=3)
    ap.add_argument("--start-qps", type=float, default=20.0)
    ap.add_argument("--paths", help="comma-separated single paths to compare (default: all)")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks/results/serving.json")
    args = ap.parse_args(argv)
    from rewrite.artifact import open_bundle

    b = open_bundle(args.bundle, check_files=False)
    rows, paths = b.table_rows(), (args.paths.split(",") if args.paths else b.verified_paths())
    result = {"bundle": str(args.bundle), "host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
              "p99_target_ms": args.p99_target, "step_s": args.step,
              "command": "PYTHONPATH=. python " + " ".join([sys.argv[0], *sys.argv[1:]])}
    t0 = time.time()

    mlperf = RequestPool(rows, b.n_dense, parse_sizes("mlperf", args.max_batch), 256, 1, args.data)
    series, multi = {}, {}
    auc = ["--data", str(args.data)] if args.data else []
    multi["load-aware"] = find_max(args.bundle, args, mlperf, args.p99_target, "load-aware", auc)
    for p in paths:
        multi[p] = find_max(args.bundle, args, mlperf, args.p99_target, p, ["--path", p])
    single_best = max(paths, key=lambda p: multi[p]["max_qps"] or 0)
    most_accurate = multi["load-aware"]["server_paths"]["levels"][0]
    measured = [p for p in most_accurate if p in multi]          # --paths may leave the level out
    best_accurate = max(measured, key=lambda p: multi[p]["max_qps"] or 0) if measured else None
    la = multi["load-aware"]["max_qps"] or 0
    result["multi_path"] = {
        "sizes": "mlperf", "contenders": {k: {"max_qps": v["max_qps"], "at_max": v["at_max"],
                                              "server_paths": v["server_paths"]} for k, v in multi.items()},
        "best_single_path": single_best,
        "ratio_vs_best_single": la / (multi[single_best]["max_qps"] or float("nan")),
        "most_accurate_level": most_accurate, "best_most_accurate_path": best_accurate,
        "ratio_vs_most_accurate_single": (la / (multi[best_accurate]["max_qps"] or float("nan"))
                                          if best_accurate else None),
        "goal": ">= 1.5x the best single path"}
    series.update({f"mlperf {k}": v["points"] for k, v in multi.items()})

    small = RequestPool(rows, b.n_dense, parse_sizes("lognormal:median=2,p99=64", args.max_batch), 256, 2, args.data)
    batch = {}
    for label, extra in (("batching", []), ("no batching", ["--no-batching"])):
        batch[label] = find_max(args.bundle, args, small, args.p99_target, label, ["--path", single_best, *extra])
    series.update({f"small {k}": v["points"] for k, v in batch.items()})
    result["batching"] = {"sizes": "lognormal:median=2,p99=64", "path": single_best,
                          "contenders": {k: {"max_qps": v["max_qps"], "at_max": v["at_max"]} for k, v in batch.items()},
                          "ratio": (batch["batching"]["max_qps"] or 0) / (batch["no batching"]["max_qps"] or float("nan")),
                          "goal": ">= 3x no batching"}
    result["overhead_batch1"] = overhead(args.bundle, single_best, rounds=5, calls=200)
    result["overhead_batch1"]["goal"] = "server p50 <= 2 x in-process p50 + 0.1 ms"
    result["seconds"] = time.time() - t0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    loadgen.plot(series, args.p99_target, args.output.with_suffix(".png"),
                 f"{args.bundle.name} on {result['cpu']} ({result['cores']} cores)")
    print(json.dumps({k: result[k] for k in ("multi_path", "batching", "overhead_batch1")}, indent=1,
                     default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
