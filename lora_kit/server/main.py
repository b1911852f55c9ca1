"""Running the app: ``serve(args)`` for ``lora-kit serve``, and a background server for tests and the demo."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any, Optional

TOKEN_ENV = "LORA_KIT_API_TOKEN"


def configure_logging(level: str = "info") -> None:
    """Access log lines (JSON), server and engine messages on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("lora_kit.access", "lora_kit.server", "lora_kit.engine"):
        log = logging.getLogger(name)
        if not log.handlers:
            log.addHandler(handler)
        log.setLevel(level.upper())
        log.propagate = False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; ``port`` 0 picks a free one (read it back with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: Any, host: str, port: int, graceful_timeout: float = 30.0) -> Any:
    """A uvicorn server for ``app``; our own access log replaces uvicorn's."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(graceful_timeout),
        lifespan="off",
    )
    return uvicorn.Server(config)


def serve(args: Any) -> int:
    """Load the base once, start the engine, serve until SIGTERM/SIGINT, then stop the engine.

    On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish for up
    to ``--graceful-timeout`` seconds, then cancels them (which cancels them in the engine).
    """
    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.engine.threads import dedicate_cpu_threads
    from lora_kit.registry import Registry
    from lora_kit.server.app import create_app

    dedicate_cpu_threads()  # the decode loop gets the cores; this thread only serves HTTP
    configure_logging(args.log_level)
    token = args.api_token or os.environ.get(TOKEN_ENV) or None
    engine = Engine(EngineConfig.from_cli_args(args))
    engine.start()
    try:
        app = create_app(engine, Registry(), api_token=token, max_tokens_cap=args.max_tokens_cap)
        sock = bind_socket(args.host, args.port)
        host, port = sock.getsockname()[:2]
        server = uvicorn_server(app, args.host, port, args.graceful_timeout)
        print(
            f"lora-kit: serving {engine.model_name} on http://{host}:{port} "
            f"(Cloudflare: /client/v4/accounts/<id>/ai/run/<model>, OpenAI: /v1; auth {'on' if token else 'off'})",
            file=sys.stderr,
            flush=True,
        )
        with _quiet_stop_signals():
            server.run(sockets=[sock])
    finally:
        engine.stop(args.graceful_timeout)
    print("lora-kit: server stopped", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _quiet_stop_signals() -> Iterator[None]:
    """Make SIGTERM/SIGINT a clean exit.

    uvicorn handles these signals itself (graceful shutdown), then re-raises them to the
    handlers it found; with Python's defaults that would kill the process before the engine
    is stopped. A no-op handler turns the re-raise into a normal return.
    """
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """The app served by uvicorn on a free port of 127.0.0.1 in a thread (tests, demo).

    ``with BackgroundServer(app) as srv: srv.url`` ... stops it on exit.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn_server(app, host, self.port, graceful_timeout=5)
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        import time

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
