"""Running the app: ``serve(config, engine_config, replicas)`` for ``lora-kit serve``, and a background server for tests and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional

from lora_kit.logs import StderrHandler
from lora_kit.server.config import ServerConfig

if TYPE_CHECKING:
    from lora_kit.engine.config import EngineConfig
    from lora_kit.server.ray_config import ReplicaConfig


def configure_logging(level: str = "info") -> None:
    """Access log lines (JSON), server and engine messages on stderr."""
    handler = StderrHandler()  # the current sys.stderr at each record (tests swap and close it)
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


# After the grace period, the time the request handlers get to write their 3050/503 bodies and
# SSE error events (and the engine to finish its current step) before uvicorn cancels them.
SHUTDOWN_SETTLE_S = 10.0

logger = logging.getLogger("lora_kit.server")


def uvicorn_server(
    app: Any,
    host: str,
    port: int,
    graceful_timeout: float = 30.0,
    *,
    on_shutdown: Optional[Callable[[], None]] = None,
    on_grace_end: Optional[Callable[[], None]] = None,
) -> Any:
    """A uvicorn server for ``app``; our own access log replaces uvicorn's.

    On shutdown (SIGTERM/SIGINT, ``should_exit``) ``on_shutdown`` runs first (refuse new work),
    then in-flight requests get ``graceful_timeout`` seconds; ``on_grace_end`` (blocking, run in a
    worker thread) then fails what is left, and the handlers get :data:`SHUTDOWN_SETTLE_S` to
    answer before uvicorn cancels them. Without the hooks: plain uvicorn (cancelled at the end of
    the grace period).
    """
    import uvicorn

    settle = SHUTDOWN_SETTLE_S if on_grace_end is not None else 0.0
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=graceful_timeout + settle,  # typed int; uvicorn only waits on it
        lifespan="off",
    )
    if on_shutdown is None and on_grace_end is None:
        return uvicorn.Server(config)
    return _draining_server_class()(config, graceful_timeout, on_shutdown, on_grace_end)


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn whose shutdown fails the requests left at the end of the grace period *before*
        it cancels their handlers, so every client hears an answer (see :func:`uvicorn_server`)."""

        def __init__(
            self,
            config: Any,
            grace: float,
            on_shutdown: Optional[Callable[[], None]],
            on_grace_end: Optional[Callable[[], None]],
        ) -> None:
            super().__init__(config)
            self.grace = grace
            self.on_shutdown = on_shutdown
            self.on_grace_end = on_grace_end

        async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
            if self.on_shutdown is not None:
                self.on_shutdown()
            timer = asyncio.ensure_future(self._end_grace())
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        async def _end_grace(self) -> None:
            await asyncio.sleep(self.grace)
            if self.on_grace_end is None:
                return
            logger.warning(
                "grace period of %gs over with %d request(s) in flight; failing them with 3050/503",
                self.grace,
                len(self.server_state.tasks),
            )
            await asyncio.to_thread(self.on_grace_end)

    return DrainingServer


def serve(config: ServerConfig, engine_config: EngineConfig, replicas: Optional[ReplicaConfig] = None) -> int:
    """Load the base once, start the engine, serve until SIGTERM/SIGINT, then stop the engine.

    With ``replicas.replicas`` > 0 the engine runs as replicas on Ray Serve instead
    (:func:`~lora_kit.server.ray_app.serve_replicated`). On SIGTERM uvicorn stops accepting
    connections, new inference requests get 3050/503, and in-flight requests may finish for up to
    ``config.graceful_timeout`` seconds. Then the engine stops for good: each request still waiting
    or running ends with ShuttingDown, which its handler answers as the 3050/503 envelope (a
    stream: an in-band error event, then ``[DONE]``) before uvicorn closes the connections.
    """
    from lora_kit.engine import Engine
    from lora_kit.engine.threads import dedicate_cpu_threads

    configure_logging(config.log_level)
    if replicas is not None and replicas.replicas:
        from lora_kit.server.ray_app import serve_replicated

        return serve_replicated(config, engine_config, replicas)
    dedicate_cpu_threads()  # the decode loop gets the cores; this thread only serves HTTP
    engine = Engine(engine_config)
    engine.start()
    try:
        _serve_engine(config, engine)
    finally:
        engine.stop(config.graceful_timeout, shutting_down=True)
    print("lora-kit: server stopped", file=sys.stderr)
    return 0


def _serve_engine(config: ServerConfig, engine: Any) -> None:
    """Serve the app over the started ``engine`` on ``config.host:config.port`` until SIGTERM/SIGINT."""
    from lora_kit.registry import Registry
    from lora_kit.server.app import begin_shutdown, create_app

    app = create_app(engine, Registry(), config)
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn_server(
        app,
        config.host,
        port,
        config.graceful_timeout,
        on_shutdown=lambda: begin_shutdown(app),
        on_grace_end=lambda: engine.stop(SHUTDOWN_SETTLE_S / 2, shutting_down=True),
    )
    print(
        f"lora-kit: serving {engine.model_name} on http://{host}:{port} "
        f"(Cloudflare: /client/v4/accounts/<id>/ai/run/<model>, OpenAI: /v1; "
        f"auth {'on' if config.api_token else 'off'}; management {'on' if config.management else 'off'}"
        f"{f'; playground: http://{host}:{port}/' if config.serve_ui else ''})",
        file=sys.stderr,
        flush=True,
    )
    with _quiet_stop_signals():
        server.run(sockets=[sock])


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
