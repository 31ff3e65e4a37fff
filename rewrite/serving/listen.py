"""Running the app on uvicorn: a bound socket, the startup line, SIGTERM -> drain -> exit 0.

``serve_forever(app, host, port)`` binds first (``port`` 0 picks a free one), prints
``serving <model> on http://HOST:PORT`` on stderr once the socket is listening, and returns when
the server stopped.  On SIGTERM or SIGINT uvicorn stops accepting connections, waits up to
``drain_s`` for the requests in flight (their batches finish: ``Scheduler.close``), and this
function returns normally, so the process exits 0.  (uvicorn re-raises the signal it caught
once it has shut down; a no-op handler installed first receives it instead of the default one,
which would kill the process with status -15.)

``ServerThread`` runs the same server on a background thread (no signal handling): for tests
and benchmarks that want the server in-process.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading

import uvicorn


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _config(app, drain_s: float) -> uvicorn.Config:
    return uvicorn.Config(app.asgi, loop="uvloop", http="httptools", lifespan="on", access_log=False,
                          log_level="warning", timeout_graceful_shutdown=drain_s, backlog=2048)


def serve_forever(app, host: str, port: int, drain_s: float = 30.0) -> None:
    sock = bind(host, port)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    server = uvicorn.Server(_config(app, drain_s))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)         # receives uvicorn's re-raised signal
    started = server.startup

    async def startup(sockets=None):
        await started(sockets)
        grpc = "" if app.grpc_port is None else f" and grpc://{host}:{app.grpc_port}"
        print(f"serving {app.cfg.model_name} on {url}{grpc}", file=sys.stderr, flush=True)

    server.startup = startup
    server.run(sockets=[sock])


class ServerThread:
    """``with ServerThread(app) as url:`` a live server on 127.0.0.1 for the block."""

    def __init__(self, app, host: str = "127.0.0.1", drain_s: float = 10.0):
        self.sock = bind(host, 0)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(_config(app, drain_s))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            self.thread.join(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
