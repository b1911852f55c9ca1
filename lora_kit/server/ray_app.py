"""``lora-kit serve --replicas N``: engine replicas on Ray Serve behind a gateway, routed by adapter.

Three parts, all Ray's own mechanisms (no home-made cluster):

- **EngineReplica** (a Serve deployment, ``N`` replicas): one :class:`~lora_kit.engine.Engine`
  each, continuous batching and mixed-adapter batches intact. A stream's tokens go back in
  batches (the first at once, then what is ready every ``--stream-interval-ms``:
  :mod:`~lora_kit.server.coalesce`), not as one Ray object each. A request arrives with
  ``multiplexed_model_id`` = its adapter's canonical reference (``NAME@VERSION``, immutable); the
  ``@serve.multiplexed`` loader puts the adapter in an engine slot, with a per-replica model
  count equal to the engine's slots, so Ray's LRU and the engine's agree and Ray's router
  prefers the replica that already holds the adapter. ``@serve.batch`` is not used: it splits
  batches by model id, which would undo mixed-adapter batches.
- **Gateway** (a Serve ingress deployment): the same FastAPI app as the single process
  (:func:`~lora_kit.server.app.create_app`, every route, auth, envelope, metrics), over a
  :class:`RemoteEngine` that resolves ``lora`` in the registry first (an unknown adapter is
  3037/404 before any routing) and streams each request's events from a replica token by token.
  Responses name the replica in ``X-Lora-Kit-Replica``.
- **AdapterDirectory** (a named Ray actor): what every replica must hear (runtime unloads: free
  these slots) and what each replica reports (its resident adapters and queue), polled by every
  replica twice a second. Serve has no broadcast to replicas; this is its stand-in.

The registry root must be the same path on every node (a shared volume): its files are
content-addressed and written by rename, so a replica never reads a half-written adapter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Optional

from lora_kit.engine.adapters import resolve_adapter
from lora_kit.engine.config import EngineConfig
from lora_kit.engine.types import (
    AdapterError,
    AdapterWeight,
    EngineError,
    GenerationOutput,
    GenerationRequest,
    InvalidAdapterReference,
    InvalidRequest,
    Overloaded,
    RequestFailed,
    ResolvedAdapter,
    SamplingParams,
    ShuttingDown,
    UnknownAdapter,
)
from lora_kit.server.coalesce import coalesced
from lora_kit.server.config import ServerConfig
from lora_kit.server.ray_config import ReplicaConfig

logger = logging.getLogger("lora_kit.server")

APP_NAME = "lora-kit"
DIRECTORY = "lora-kit-adapter-directory"
NAMESPACE = "lora-kit"
REPLICA_HEADER = "X-Lora-Kit-Replica"
POLL_S = 0.5  # how often a replica reads the directory and reports to it
STALE_S = 5.0  # a replica silent this long is presumed gone (a drop does not wait for it)

# Errors a replica sends back by name; anything else becomes RequestFailed (the id only).
_ERRORS: dict[str, type[EngineError]] = {
    cls.__name__: cls
    for cls in (UnknownAdapter, AdapterError, InvalidRequest, InvalidAdapterReference, Overloaded, ShuttingDown)
}


# -- the wire form of a request and of an error ----------------------------------------------------


def request_payload(request: GenerationRequest) -> dict[str, Any]:
    """A request as plain data for a replica (a mix as ``[[ref, scale], ...]``)."""
    adapter: Any = request.adapter
    if adapter is not None and not isinstance(adapter, str):
        adapter = [[entry.ref, entry.scale] for entry in adapter]
    return {
        "prompt_ids": list(request.prompt_ids),
        "params": dataclasses.asdict(request.params),
        "adapter": adapter,
        "response_format": request.response_format,
        "tools": request.tools,
        "tool_choice": request.tool_choice,
        "request_id": request.request_id,
        # resolved once at the gateway; the registry root is one path on every node
        "resolved": {ref: [str(r[1]), r.files] for ref, r in request.resolved_adapters.items()},
    }


def request_from_payload(payload: dict[str, Any]) -> GenerationRequest:
    adapter = payload["adapter"]
    if isinstance(adapter, list):
        adapter = [AdapterWeight(ref, scale) for ref, scale in adapter]
    return GenerationRequest(
        prompt_ids=payload["prompt_ids"],
        params=SamplingParams(**payload["params"]),
        adapter=adapter,
        response_format=payload["response_format"],
        tools=payload["tools"],
        tool_choice=payload["tool_choice"],
        request_id=payload["request_id"],
        resolved_adapters={
            ref: ResolvedAdapter(ref, path, files) for ref, (path, files) in payload.get("resolved", {}).items()
        },
    )


def error_payload(err: BaseException, request_id: Optional[str]) -> dict[str, Any]:
    """An engine error as data; an unexpected one is logged here and named by the request id only."""
    kind = type(err).__name__
    if kind == "GrammarError":
        return {"error": "InvalidRequest", "message": str(err), "field": getattr(err, "field", None)}
    if kind in _ERRORS:
        return {"error": kind, "message": str(err)}
    if not isinstance(err, RequestFailed):
        logger.error("request %s failed on this replica: %r", request_id, err, exc_info=err)
    return {"error": "RequestFailed", "message": str(getattr(err, "request_id", None) or request_id)}


def error_from_payload(item: dict[str, Any]) -> EngineError:
    kind, message = item["error"], item.get("message", "")
    if kind == "InvalidRequest" and item.get("field"):
        from lora_kit.engine.constraints import GrammarError

        return GrammarError(message, item["field"])
    if kind in _ERRORS:
        return _ERRORS[kind](message)
    return RequestFailed(message or "unknown")


def mux_id(adapter: Any) -> str:
    """The multiplexed model id of a request: its adapter's canonical reference, a mix's first one,
    or "" for the base (no affinity)."""
    if adapter is None:
        return ""
    if isinstance(adapter, str):
        return adapter
    return adapter[0].ref if adapter else ""


# -- the directory: broadcasts to replicas, and their reports ---------------------------------------


class AdapterDirectory:
    """A log of runtime drops (each with an epoch) and the last report of each replica.

    Run as a named Ray actor (``directory_actor``); replicas poll it, the gateway writes to it.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.drops: list[tuple[int, str]] = []
        self.reports: dict[str, dict[str, Any]] = {}

    def drop(self, key: str) -> int:
        """Ask every replica to free ``key``'s slot; the epoch to wait for."""
        self.epoch += 1
        self.drops.append((self.epoch, key))
        return self.epoch

    def since(self, epoch: int) -> tuple[int, list[str]]:
        """The current epoch and the keys dropped after ``epoch``."""
        return self.epoch, [key for e, key in self.drops if e > epoch]

    def report(self, replica: str, epoch: int, stats: dict[str, Any], node: str | None = None) -> None:
        """A replica's state: the drops it applied, its engine's stats, the Ray node it runs on."""
        self.reports[replica] = {"epoch": epoch, "stats": stats, "node": node, "at": time.time()}

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Replicas heard from in the last ``STALE_S`` seconds: their applied epoch and stats."""
        now = time.time()
        return {r: rep for r, rep in self.reports.items() if now - rep["at"] < STALE_S}


def directory_actor(create: bool = False) -> Any:
    """The named directory actor (created by the launcher, found by the deployments)."""
    import ray

    if create:
        remote = ray.remote(num_cpus=0)(AdapterDirectory)
        return remote.options(name=DIRECTORY, namespace=NAMESPACE, get_if_exists=True).remote()
    return ray.get_actor(DIRECTORY, namespace=NAMESPACE)


# -- the engine replica --------------------------------------------------------------------------------


class _Lease:
    """What Ray's multiplex LRU holds for one adapter on a replica. Ray calls ``__del__`` when it
    unloads the adapter (its LRU is full): the engine slot is freed as its requests finish."""

    def __init__(self, engine: Any, key: str) -> None:
        self.engine, self.key = engine, key

    def __del__(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.drop_adapter(self.key)


class EngineReplicaBase:
    """One engine on one Serve replica (the deployment class is built by :func:`engine_deployment`)."""

    stream_interval = 0.0  # seconds a stream's tokens gather before they go as one event (see coalesce.py)

    def __init__(self, config: EngineConfig, registry_root: str) -> None:
        from ray import serve

        from lora_kit.engine import Engine
        from lora_kit.engine.threads import dedicate_cpu_threads

        dedicate_cpu_threads()  # as `lora-kit serve` does: the decode loop owns the only OpenMP pool
        self.engine = Engine(config, registry_root=registry_root)
        self.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._given: dict[str, ResolvedAdapter] = {}  # resolutions for the multiplexed loader, by key
        self.directory = directory_actor()
        self._poller = threading.Thread(target=self._poll, name="lora-kit-directory", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        """Apply the drops the directory holds, and report this replica's state, every POLL_S."""
        import ray

        epoch, _ = ray.get(self.directory.since.remote(1 << 62))  # start at the present: old drops are moot
        node = ray.get_runtime_context().get_node_id()
        while True:
            try:
                epoch, keys = ray.get(self.directory.since.remote(epoch))
                for key in keys:
                    self.engine.drop_adapter(key)
                self.directory.report.remote(self.replica, epoch, self.engine.stats(), node)
            except Exception as err:  # noqa: BLE001 - the directory restarts with the app; keep polling
                logger.warning("replica %s: directory poll failed: %r", self.replica, err)
            time.sleep(POLL_S)

    async def _warm(self, key: str) -> _Lease:
        given = self._given.pop(key, None)  # the gateway's resolution, when a request brought one
        await asyncio.to_thread(self.engine.check_adapter, given or key)
        return _Lease(self.engine, key)

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The request's events as data: first ``{"replica": id}``, then outputs, or one error."""
        from ray import serve

        yield {"replica": self.replica}
        request_id = payload.get("request_id")
        _single_threaded()  # Serve's event-loop thread submits (small torch ops): no OpenMP pool of its own
        try:
            request = request_from_payload(payload)
            key = serve.get_multiplexed_model_id()
            if key:
                if key in request.resolved_adapters:
                    self._given[key] = request.resolved_adapters[key]
                await self.adapter(key)  # type: ignore[attr-defined]  # the multiplexed loader (see engine_deployment)
            async for out in coalesced(self.engine.generate(request), self.stream_interval):
                yield {"output": dataclasses.asdict(out)}
        except Exception as err:  # noqa: BLE001 - sent back as data, rebuilt at the gateway
            yield error_payload(err, request_id)

    def validate_adapter(self, path: str, name: str) -> Optional[dict[str, Any]]:
        """A runtime load's check (the gateway has no model): None, or the AdapterError as data."""
        try:
            self.engine.validate_adapter(path, name)
        except Exception as err:  # noqa: BLE001 - sent back as data, rebuilt at the gateway
            return error_payload(err, None)
        return None

    def check_health(self) -> None:
        """Serve's health check: a replica whose decode loop died is restarted."""
        if self.engine.loop_failed():
            raise RuntimeError("the engine's decode loop is not running")


_pinned = threading.local()


def _single_threaded() -> None:
    """Keep the calling thread at one torch thread (once per thread), as ``lora-kit serve`` keeps its
    HTTP thread: a second OpenMP pool in the process makes the decode loop's parallel regions wait
    for sleeping workers (see :mod:`lora_kit.engine.threads`)."""
    if not getattr(_pinned, "done", False):
        import torch

        torch.set_num_threads(1)
        _pinned.done = True


def engine_deployment(engine_config: EngineConfig, replicas: ReplicaConfig) -> Any:
    """The Serve deployment of engine replicas, its multiplex size equal to the engine's slots."""
    from ray import serve

    class EngineReplica(EngineReplicaBase):
        stream_interval = replicas.stream_interval_ms / 1000

        @serve.multiplexed(max_num_models_per_replica=engine_config.max_slots)
        async def adapter(self, key: str) -> _Lease:
            return await self._warm(key)

    env = {"OMP_NUM_THREADS": str(replicas.threads), "LORA_KIT_HOME": os.environ.get("LORA_KIT_HOME", "")}
    options: dict[str, Any] = {"num_cpus": replicas.replica_cpus, "runtime_env": {"env_vars": env}}
    if replicas.replica_gpus:
        options["num_gpus"] = replicas.replica_gpus
    return serve.deployment(
        EngineReplica,
        name="EngineReplica",
        num_replicas=replicas.replicas,
        ray_actor_options=options,
        # Ray must not hold requests back below what the engine batches and queues itself.
        max_ongoing_requests=replica_capacity(engine_config),
        health_check_period_s=2,
    )


# -- the gateway ---------------------------------------------------------------------------------------


class RemoteEngine:
    """What the HTTP app needs of an engine, served by the engine replicas through Ray.

    ``resolve``/``check_adapter`` resolve in the registry (no slot is taken here: the replica loads
    it, with the resolution the request carries);
    ``generate`` streams from the replica Ray picks for the request's adapter; ``stats`` sums
    the replicas' last reports; ``drop_adapter`` reaches every replica through the directory.
    """

    def __init__(self, handle: Any, directory: Any, config: EngineConfig, registry_root: str) -> None:
        from lora_kit import models
        from lora_kit.engine.adapters import registry_resolver

        self._handle = handle.options(stream=True)
        self._unary = handle
        self._directory = directory
        self._resolve = registry_resolver(registry_root)
        self.model_name = config.model
        self.tokenizer = models.load_tokenizer(config.model)
        self.max_slots = config.max_slots
        self._reports: dict[str, dict[str, Any]] = {}
        threading.Thread(target=self._follow_reports, name="lora-kit-reports", daemon=True).start()

    def _follow_reports(self) -> None:
        import ray

        while True:
            try:
                self._reports = ray.get(self._directory.replicas.remote())
            except Exception as err:  # noqa: BLE001 - stats are best effort; keep trying
                logger.warning("gateway: reading replica reports failed: %r", err)
            time.sleep(POLL_S)

    def resolve(self, ref: str) -> ResolvedAdapter:
        """What ``ref`` names, resolved in the registry (the replicas load it from the same path)."""
        return resolve_adapter(self._resolve, ref)

    def check_adapter(self, ref: str | ResolvedAdapter) -> str:
        """The canonical reference of ``ref``; no slot is taken here (the replica loads it)."""
        return ref.key if isinstance(ref, ResolvedAdapter) else self.resolve(ref).key

    def validate_adapter(self, path: str, name: str) -> None:
        """Check ``path`` on one replica (the gateway holds no model); blocking, off the event loop."""
        failure = self._unary.validate_adapter.remote(path, name).result()
        if failure is not None:
            raise error_from_payload(failure)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """The request's events from a replica; engine errors raise at the first iteration."""
        return self._events(request)

    async def _events(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        stream = self._handle.options(multiplexed_model_id=mux_id(request.adapter)).generate.remote(
            request_payload(request)
        )
        replica = None
        try:
            async for item in stream:
                if "replica" in item:
                    replica = item["replica"]
                elif "error" in item:
                    raise error_from_payload(item)
                else:
                    yield GenerationOutput(**{**item["output"], "replica": replica})
        except EngineError:
            raise
        except Exception as err:  # the replica died or Ray could not reach one
            logger.error("request %s lost its replica: %r", request.request_id, err)
            raise RequestFailed(request.request_id or "unknown") from err
        finally:
            stream.cancel()  # the client left early: the replica's generator stops and frees the row

    def stats(self) -> dict[str, Any]:
        """The replicas' engine stats summed (resident adapters: the union; each replica has its own
        prefix cache, summed too), from their last reports."""
        reports = [r["stats"] for r in self._reports.values()]
        finished: dict[str, int] = {}
        for stats in reports:
            for reason, n in stats.get("finished", {}).items():
                finished[reason] = finished.get(reason, 0) + n
        prefix: dict[str, int] = {}
        for stats in reports:
            for key, n in (stats.get("prefix_cache") or {}).items():
                prefix[key] = prefix.get(key, 0) + n
        return {
            "queue_depth": sum(s.get("queue_depth", 0) for s in reports),
            "running": sum(s.get("running", 0) for s in reports),
            "finished": finished,
            "resident_adapters": sorted({a for s in reports for a in s.get("resident_adapters", [])}),
            "slots": sum(s.get("slots", 0) for s in reports),
            "prefix_cache": prefix,
            "replicas": {r: rep["stats"] for r, rep in self._reports.items()},
        }

    def drop_adapter(self, key: str, timeout: float = 10.0) -> bool:
        """Tell every replica to free ``key``'s slot, and wait until every live replica has heard."""
        import ray

        epoch = ray.get(self._directory.drop.remote(key))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = ray.get(self._directory.replicas.remote())
            if all(rep["epoch"] >= epoch for rep in live.values()):
                return True
            time.sleep(POLL_S / 5)
        logger.warning("drop of %s: not every replica confirmed within %.0fs", key, timeout)
        return True

    def start(self) -> None:
        """Ray runs the replicas: nothing to start here."""

    def stop(self, timeout: float = 10.0, *, shutting_down: bool = False) -> None:
        """Ray stops the replicas (``serve.shutdown``): nothing to stop here."""


class GatewayBase:
    """The HTTP app over a :class:`RemoteEngine` (the ingress class is built by :func:`gateway_deployment`)."""

    def __init__(self, handle: Any, config: EngineConfig, server: ServerConfig, registry_root: str) -> None:
        self._engine = RemoteEngine(handle, directory_actor(), config, registry_root)
        self._server = server
        self._registry_root = registry_root

    def __serve_build_asgi_app__(self) -> Any:
        from lora_kit.registry import Registry
        from lora_kit.server.app import create_app

        return create_app(self._engine, Registry(Path(self._registry_root)), self._server)


def gateway_deployment(max_ongoing_requests: int) -> Any:
    """The ingress deployment. ``max_ongoing_requests``: what every engine replica takes at once
    (running and queued), summed. Ray's default (5) held a server of 16-row batches to 5 requests
    in flight: 0.4x one process's tokens/s (BENCHMARKS.md, issue 24)."""
    from ray import serve

    @serve.ingress()
    class Gateway(GatewayBase):
        pass

    return serve.deployment(
        Gateway,
        name="Gateway",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max_ongoing_requests,
    )


def build_app(engine_config: EngineConfig, replicas: ReplicaConfig, server: ServerConfig, registry_root: str) -> Any:
    """The Serve application: the gateway bound to the engine replicas."""
    config = dataclasses.replace(engine_config, threads=replicas.threads)
    engines = engine_deployment(engine_config, replicas).bind(config, registry_root)
    ongoing = replica_capacity(engine_config) * max(1, replicas.replicas)
    return gateway_deployment(ongoing).bind(engines, config, server, registry_root)


def replica_capacity(engine_config: EngineConfig) -> int:
    """Requests one engine replica takes at once: its batch and its queue (more would be 429s)."""
    return engine_config.max_batch + engine_config.max_queue


# -- the launcher ----------------------------------------------------------------------------------------


def serve_replicated(server: ServerConfig, engine_config: EngineConfig, replicas: ReplicaConfig) -> int:
    """Start (or join) Ray, deploy the gateway and ``replicas.replicas`` engine replicas, and serve
    until SIGTERM/SIGINT; then delete the application (a cluster that was joined keeps running)."""
    import signal

    import ray
    from ray import serve

    from lora_kit.registry import Registry

    registry_root = str(Registry().root)
    ray.init(address=replicas.ray_address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    try:
        directory = directory_actor(create=True)  # held here: an actor without a handle is destroyed
        serve.start(proxy_location=replicas.proxy_location, http_options={"host": server.host, "port": server.port})
        serve.run(build_app(engine_config, replicas, server, registry_root), name=APP_NAME, route_prefix="/")
        print(
            f"lora-kit: serving {engine_config.model} with {replicas.replicas} engine replicas on Ray Serve at "
            f"http://{server.host}:{server.port} (auth {'on' if server.api_token else 'off'})",
            file=sys.stderr,
            flush=True,
        )
        stops = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        signal.sigwait(stops)
        print("lora-kit: stopping the replicas", file=sys.stderr, flush=True)
        _stop_serving(joined=replicas.ray_address is not None)
        ray.kill(directory)
    finally:
        ray.shutdown()  # a local Ray (not joined) stops with its driver
    print("lora-kit: server stopped", file=sys.stderr, flush=True)
    return 0


def _stop_serving(joined: bool, timeout: float = 60.0) -> None:
    """Delete the application (a joined cluster keeps its other applications and Serve), or shut
    Serve down on a Ray of our own; bounded, so a broken cluster cannot hang the exit."""
    from ray import serve

    stop = threading.Thread(target=(lambda: serve.delete(APP_NAME)) if joined else serve.shutdown, daemon=True)
    stop.start()
    stop.join(timeout)
    if stop.is_alive():
        logger.warning("Ray Serve did not stop within %.0fs; exiting anyway", timeout)
