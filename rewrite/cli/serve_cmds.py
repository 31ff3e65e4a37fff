"""`rewrite serve` and `rewrite loadtest`: a bundle behind the v2 protocol, and load against it."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from rewrite.cli.group import emit, force_option, json_option, main, refuse_existing, strict_json
from rewrite.core.errors import RewriteError


def _seconds(text: str, what: str, bare_unit: float) -> float:
    from rewrite.core.units import parse_seconds

    text = str(text).strip()
    if text.replace(".", "", 1).isdigit():
        value = float(text) * bare_unit
    else:
        try:
            value = parse_seconds(text)
        except RewriteError:
            raise RewriteError(f"{what} {text!r}: expected a time such as 500us, 10ms or 0.5s") from None
    if value <= 0 and what != "--max-delay":
        raise RewriteError(f"{what} must be positive, got {text!r}")
    return value


def _loopback_or_told(host: str) -> None:
    if not host:
        raise RewriteError("--host must not be empty (127.0.0.1 serves this machine only)")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0: every interface)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: a free port")
@click.option("--model-name", help="the v2 model name [default: the bundle directory's name]")
@click.option("--max-batch", default=2048, show_default=True, type=click.IntRange(min=1),
              help="samples per merged batch (and per request)")
@click.option("--max-delay", default="500", show_default=True,
              help="longest wait for more requests once one is queued (µs, or 1ms, 0.2ms ...); 0: no wait")
@click.option("--p99-target", default="10ms", show_default=True, help="tail-latency target of load-aware dispatch")
@click.option("--policy", type=click.Choice(["load-aware", "batch-size"]), default="load-aware", show_default=True,
              help="path per merged batch: by size and queue state, or by size only (the bundle's ranges)")
@click.option("--path", "path", help="serve every batch on this path (a single-path baseline)")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="worker threads, each with its own loaded bundle")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 256), help="intra-op threads per worker")
@click.option("--queue-timeout", default="1s", show_default=True,
              help="a request not started within this time is answered 503")
@click.option("--max-request-bytes", default="16MiB", show_default=True, help="larger bodies are answered 413")
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="labelled data: measure each path's AUC at start-up where the manifest has none")
@click.option("--auc-samples", default=16384, show_default=True, type=click.IntRange(min=1))
@click.option("--log-interval", default="60s", show_default=True, help="period of the info log line")
@click.option("--no-batching", is_flag=True, help="one request per predict (a baseline)")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535),
              help="the v2 gRPC service's port (0: a free one)")
@click.option("--no-grpc", is_flag=True, help="serve HTTP only")
def serve(bundle, host, port, model_name, max_batch, max_delay, p99_target, policy, path, workers, threads,
          queue_timeout, max_request_bytes, data_path, auc_samples, log_interval, no_batching,
          grpc_port, no_grpc) -> None:
    """Serve BUNDLE over the KServe v2 / Open Inference protocol (HTTP and gRPC), with dynamic batching."""
    from rewrite.serving.listen import serve_forever
    from rewrite.serving.server import ServeConfig, build
    from rewrite.core.units import parse_bytes

    _loopback_or_told(host)
    _check_free(host, port, "--port")
    if not no_grpc:
        _check_free(host, grpc_port, "--grpc-port")
    if path and policy != "load-aware":
        raise RewriteError("--path and --policy: give one (--path fixes the path)")
    if data_path is not None and not data_path.exists():
        raise RewriteError(f"--data {data_path}: no such file")
    cfg = ServeConfig(model_name or Path(bundle).resolve().name, max_batch,
                      _seconds(max_delay, "--max-delay", 1e-6), _seconds(queue_timeout, "--queue-timeout", 1.0),
                      parse_bytes(max_request_bytes), _seconds(log_interval, "--log-interval", 1.0),
                      not no_batching, None if no_grpc else _address(host, grpc_port))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    app = build(bundle, cfg, policy, _seconds(p99_target, "--p99-target", 1e-3), path, workers, threads,
                auc_data=data_path, auc_samples=auc_samples)
    serve_forever(app, host, port)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_free(host: str, port: int, flag: str) -> None:
    """Refuse a port another process holds now, before the minutes of loading the bundle."""
    import socket

    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise RewriteError(f"{flag} {port}: cannot bind {host}:{port} ({e.strerror}); "
                               f"give another port (0: a free one)") from None


@main.command()
@click.argument("url")
@click.option("--model-name", help="the served model [default: the server's only model]")
@click.option("--qps", default=100.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="offered load (Poisson arrivals)")
@click.option("--duration", default="10s", show_default=True, help="length of the run (each step with --find-max)")
@click.option("--max-requests", default=100_000, show_default=True, type=click.IntRange(min=1))
@click.option("--sizes", default="mlperf", show_default=True,
              help="samples per query: mlperf, fixed:N or lognormal:median=M,p99=P")
@click.option("--max-batch", default=2048, show_default=True, type=click.IntRange(min=1),
              help="cap on a query's samples (the server's --max-batch)")
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="draw samples from this data file (with labels: the served AUC is reported)")
@click.option("--profile", "profile_path", type=click.Path(path_type=Path),
              help="draw ids from this access profile (`rewrite profile -o`); default uniform")
@click.option("--pool", default=512, show_default=True, type=click.IntRange(min=1), help="distinct requests prepared")
@click.option("--timeout", default="10s", show_default=True, help="wait for answers after the last send")
@click.option("--find-max", is_flag=True, help="search the highest QPS whose p99 meets --p99-target")
@click.option("--p99-target", default="10ms", show_default=True)
@click.option("--start-qps", default=50.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="write the JSON result here")
@click.option("--plot", type=click.Path(path_type=Path), help="write the latency-vs-load plot here (--find-max)")
@force_option
@json_option
def loadtest(url, model_name, qps, duration, max_requests, sizes, max_batch, data_path, profile_path, pool,
             timeout, find_max, p99_target, start_qps, seed, output, plot, force, as_json) -> None:
    """Open-loop load against a v2 server at URL: achieved QPS, p50/p95/p99, errors (bounded)."""
    from rewrite.serving import loadgen
    from rewrite.serving.workload import RequestPool, parse_sizes

    if not url.startswith(("http://", "https://")):
        raise RewriteError(f"URL {url!r}: expected http://HOST:PORT")
    refuse_existing(force, o=output, plot=plot)
    query_sizes = parse_sizes(sizes, max_batch)
    dur, wait = _seconds(duration, "--duration", 1.0), _seconds(timeout, "--timeout", 1.0)
    target_ms = 1e3 * _seconds(p99_target, "--p99-target", 1e-3)
    for p, what in ((data_path, "--data"), (profile_path, "--profile")):
        if p is not None and not p.exists():
            raise RewriteError(f"{what} {p}: no such file")
    meta = _metadata(url, model_name)
    name = meta["name"]
    rows, n_dense = meta["parameters"]["table_rows"], meta["inputs"][0]["shape"][1]
    requests = RequestPool(rows, n_dense, query_sizes, pool, seed, data_path, profile_path)
    log = lambda p: click.echo(f"  {p['offered_qps']:9.1f} q/s offered: {p['achieved_qps']:9.1f} achieved, "  # noqa: E731
                               f"p99 {p['p99_ms'] or float('nan'):8.2f} ms, errors {p['errors']}"
                               + (f"  {'pass' if p.get('passed') else 'FAIL'}" if "passed" in p else ""), err=True)
    result = {"url": url, "model": name, "sizes": query_sizes.describe(), "duration_s": dur}
    if find_max:
        result.update(loadgen.find_max(url, name, requests, target_ms, start_qps, dur, max_requests=max_requests,
                                       timeout_s=wait, seed=seed, log=log))
        if plot:
            loadgen.plot({name: result["points"]}, target_ms, plot, f"{name}: {query_sizes.describe()}")
    else:
        result.update(loadgen.run_load(url, name, requests, qps, dur, max_requests, wait, seed))
        log(result)
    result["server_paths"] = _get_json(f"{url.rstrip('/')}/v2/models/{name}/paths")
    if output:
        output.write_text(json.dumps(strict_json(result), indent=1, allow_nan=False) + "\n")
    emit(result, as_json, _human)


def _get_json(url: str):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RewriteError(f"{url}: {getattr(e, 'reason', e)}") from None


def _metadata(url: str, model: str | None):
    if not model:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{url.rstrip('/')}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                models = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RewriteError(f"{url}: cannot list models ({getattr(e, 'reason', e)}); give --model-name") from None
        if len(models) != 1:
            raise RewriteError(f"{url} serves {len(models)} models; give --model-name")
        model = models[0]["name"]
    return _get_json(f"{url.rstrip('/')}/v2/models/{model}")


def _human(d) -> str:
    if "max_qps" in d:
        m = d["max_qps"]
        at = d.get("at_max") or {}
        return (f"max QPS at p99 <= {d['p99_target_ms']:g} ms: " + (f"{m:.1f}" if m else "none passed")
                + (f" (p99 {at['p99_ms']:.2f} ms, {at['samples_per_s']:.0f} samples/s)" if at else ""))
    p = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"{d['ok']}/{d['requests']} ok at {d['achieved_qps']:.1f} q/s ({d['samples_per_s']:.0f} samples/s), "
            f"p50 {p(d['p50_ms'])} ms, p95 {p(d['p95_ms'])} ms, p99 {p(d['p99_ms'])} ms, errors {d['errors']}"
            + (f", served AUC {d['served_auc']:.5f}" if d.get("served_auc") is not None else ""))
