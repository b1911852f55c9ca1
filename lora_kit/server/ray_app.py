"""``lora-kit serve --replicas N``: engine replicas on Ray Serve, each serving the HTTP app, routed by adapter.

All Ray's own mechanisms (no home-made cluster), and one hop from Ray's HTTP proxy to an engine:

- **EngineReplica** (a Serve ingress deployment, ``N`` replicas): one
  :class:`~lora_kit.engine.Engine` each (continuous batching and mixed-adapter batches intact)
  and the same FastAPI app as the single process (:func:`~lora_kit.server.app.create_app`:
  every route, auth, envelope, metrics) over a :class:`ReplicaEngine`. Ray's proxy routes a
  request with a ``serve_multiplexed_model_id`` header to a replica that holds that adapter
  (Ray's model multiplexing); a request without one (every stock SDK) to the least loaded of two
  replicas, which runs it, or relays it to a replica holding its adapter when it has none
  (:class:`ReplicaEngine`). Replicas warm adapters through ``@serve.multiplexed``, with a
  per-replica model count equal to the engine's slots, so Ray's LRU and the engine's agree.
  ``@serve.batch`` is not used: it splits batches by model id, which would undo mixed batches.
  A relayed stream's tokens go back in batches (the first at once, then what is ready every
  ``--stream-interval-ms``: :mod:`~lora_kit.server.coalesce`). Responses name the replica that
  ran the request in ``X-Lora-Kit-Replica``.
- **AdapterDirectory** (a named Ray actor, :mod:`~lora_kit.server.ray_directory`): the state
  the replicas share: runtime unloads and slot drops, and each replica's stats and metrics.

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

from lora_kit.engine.config import EngineConfig
from lora_kit.engine.threads import single_threaded
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
from lora_kit.server.ray_directory import (
    NAMESPACE,
    POLL_S,
    ClusterNames,
    directory_actor,
    sum_stats,
    wait_for_epoch,
)

logger = logging.getLogger("lora_kit.server")

APP_NAME = "lora-kit"
DEPLOYMENT = "EngineReplica"

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
        # resolved once by the relaying replica; the registry root is one path on every node
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


# -- the engine replica: the HTTP app and an engine in one process ------------------------------------


class _Lease:
    """What Ray's multiplex LRU holds for one model id on a replica. Ray calls ``__del__`` when it
    unloads the id (its LRU is full): the slot of the adapter the id resolved to (``key``,
    canonical) is freed as its requests finish. A later request for it loads it again."""

    def __init__(self, engine: Any, key: str) -> None:
        self.engine, self.key = engine, key

    def __del__(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.drop_adapter(self.key)


class EngineReplicaBase:
    """One engine and the whole HTTP app on one Serve replica (the deployment class is built by
    :func:`engine_deployment`).

    ``stream_interval``: seconds a relayed stream's tokens gather before they go as one Ray object
    (see coalesce.py); ``capacity``: the requests this replica takes at once (Ray's
    ``max_ongoing_requests``: the engine's batch and queue).
    """

    stream_interval = 0.0
    capacity = 1

    def __init__(self, config: EngineConfig, server: ServerConfig, registry_root: str) -> None:
        from ray import serve

        from lora_kit.engine import Engine
        from lora_kit.engine.threads import dedicate_cpu_threads
        from lora_kit.registry import Registry
        from lora_kit.server.app import create_app

        dedicate_cpu_threads()  # as `lora-kit serve` does: the decode loop owns the only OpenMP pool
        self.engine = Engine(config, registry_root=registry_root)
        self.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._given: dict[str, ResolvedAdapter] = {}  # resolutions for the multiplexed loader, by model id
        self.directory = directory_actor()
        self.unloaded = ClusterNames(self.directory)
        self.peers: dict[str, dict[str, Any]] = {}  # the other live replicas' last reports
        self.http_app = create_app(
            ReplicaEngine(self),
            Registry(Path(registry_root)),
            server,
            unloaded=self.unloaded,
            peer_metrics=lambda: [rep["metrics"] for rep in self.peers.values() if rep.get("metrics")],
        )
        self._poller = threading.Thread(target=self._poll, name="lora-kit-directory", daemon=True)
        self._poller.start()

    def __serve_build_asgi_app__(self) -> Any:
        return self.http_app

    def _poll(self) -> None:
        """Apply the directory's drops and unloaded names, report this replica's state and read the
        others', every POLL_S."""
        import ray

        epoch, _, names = ray.get(self.directory.since.remote(1 << 62))  # old drops are moot; names are not
        self.unloaded.refresh(epoch, names)
        node = ray.get_runtime_context().get_node_id()
        metrics = self.http_app.state.lora_kit.metrics
        while True:
            try:
                epoch, keys, names = ray.get(self.directory.since.remote(epoch))
                for key in keys:
                    self.engine.drop_adapter(key)
                self.unloaded.refresh(epoch, names)
                self.directory.report.remote(self.replica, epoch, self.engine.stats(), node, metrics.snapshot())
                live = ray.get(self.directory.replicas.remote())
                self.peers = {r: rep for r, rep in live.items() if r != self.replica}
            except Exception as err:  # noqa: BLE001 - the directory restarts with the app; keep polling
                logger.warning("replica %s: directory poll failed: %r", self.replica, err)
            time.sleep(POLL_S)

    async def _warm(self, model_id: str) -> _Lease:
        given = self._given.pop(model_id, None)  # the request's resolution, when one brought it
        key = await asyncio.to_thread(self.engine.check_adapter, given or model_id)
        return _Lease(self.engine, key)

    async def serve_here(self, request: GenerationRequest, model_id: str) -> AsyncIterator[GenerationOutput]:
        """``request`` on this replica's engine. Its (first) adapter is warmed through Ray's
        multiplexed loader under ``model_id``, the string Ray routes on: Ray's router then knows
        that this replica holds it."""
        if model_id:
            key = mux_id(request.adapter)
            if key in request.resolved_adapters:
                self._given[model_id] = request.resolved_adapters[key]
            await self.adapter(model_id)  # type: ignore[attr-defined]  # the multiplexed loader (see engine_deployment)
        async for out in self.engine.generate(request):
            yield dataclasses.replace(out, replica=self.replica)

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A request relayed by another replica (:meth:`ReplicaEngine._relay`), its events as data:
        first ``{"replica": id}``, then outputs (coalesced), or one error."""
        from ray import serve

        yield {"replica": self.replica}
        request_id = payload.get("request_id")
        single_threaded()
        try:
            request = request_from_payload(payload)
            events = self.serve_here(request, serve.get_multiplexed_model_id())
            async for out in coalesced(events, self.stream_interval):
                yield {"output": dataclasses.asdict(out)}
        except Exception as err:  # noqa: BLE001 - sent back as data, rebuilt by the relaying replica
            yield error_payload(err, request_id)

    def check_health(self) -> None:
        """Serve's health check: a replica whose decode loop died is restarted."""
        if self.engine.loop_failed():
            raise RuntimeError("the engine's decode loop is not running")


class ReplicaEngine:
    """The engine as one replica's HTTP app sees it (a :class:`~lora_kit.server.serving.ServingEngine`).

    Where a request runs:

    - with a ``serve_multiplexed_model_id`` header, Ray's proxy has routed it by that string to a
      replica that holds it; it runs here. The header must name the request's adapter (its
      ``lora``, or ``model`` on the OpenAI API): 400 otherwise;
    - without one (every stock SDK), Ray picked this replica by load. A base request runs here (no
      affinity needed). An adapter request runs here too, unless this replica lacks the adapter and
      another holds it: then it is relayed through Ray, by its canonical reference, to a replica
      that holds it (a second hop, and the only one). At most half of ``capacity`` requests are
      relayed at once, so replicas relaying to each other can never fill each other's places.

    Stats sum every live replica's (``/healthz``, ``/metrics``); a drop reaches every replica.
    """

    def __init__(self, replica: EngineReplicaBase) -> None:
        self._replica = replica
        self._engine = replica.engine
        self.model_name = self._engine.model_name
        self.tokenizer = self._engine.tokenizer
        self._relays = 0
        self._relay_cap = max(1, replica.capacity // 2)
        self._handle: Any = None

    def resolve(self, ref: str) -> ResolvedAdapter:
        return self._engine.resolve(ref)

    def check_adapter(self, ref: str | ResolvedAdapter) -> str:
        """The canonical reference of ``ref``; no slot is taken here (the replica that runs it loads it)."""
        return ref.key if isinstance(ref, ResolvedAdapter) else self.resolve(ref).key

    def validate_adapter(self, path: str, name: str) -> None:
        self._engine.validate_adapter(path, name)

    def drop_adapter(self, key: str) -> bool:
        """Free ``key``'s slot on every replica; wait until every live replica has heard."""
        import ray

        epoch = ray.get(self._replica.directory.drop.remote(key))
        wait_for_epoch(self._replica.directory, epoch, f"drop of {key}")
        return True

    def stats(self) -> dict[str, Any]:
        """Every live replica's engine stats summed (this one's now, the others' last reports), and each."""
        own, peers = self._engine.stats(), self._replica.peers
        return {
            **sum_stats(own, [rep["stats"] for rep in peers.values()]),
            "replicas": {self._replica.replica: own, **{r: rep["stats"] for r, rep in peers.items()}},
        }

    def start(self) -> None:
        """The replica started its engine: nothing to start here."""

    def stop(self, timeout: float = 10.0, *, shutting_down: bool = False) -> None:
        """Ray stops the replicas (``serve.shutdown``): nothing to stop here."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """The request's events, from this replica or relayed; engine errors raise at the first iteration."""
        return self._events(request)

    async def _events(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        from ray import serve

        single_threaded()  # the app's thread submits (small torch ops): no OpenMP pool of its own
        key = mux_id(request.adapter)
        header = serve.get_multiplexed_model_id()
        if header:
            await asyncio.to_thread(self._check_header, header, key)
            events = self._replica.serve_here(request, header)
        elif key and self._relays < self._relay_cap and self._held_elsewhere_only(key):
            events = self._relay(request, key)
        else:
            events = self._replica.serve_here(request, key)
        async for out in events:
            yield out

    def _check_header(self, header: str, key: str) -> None:
        """400 unless the routing header resolves to the request's (first) adapter."""
        try:
            named = self.resolve(header).key
        except EngineError:
            named = None
        if named != key or not key:
            raise InvalidRequest(
                "the serve_multiplexed_model_id header must name the request's adapter (its lora, or model "
                "on the OpenAI API; a mix's first); leave it out for the base model"
            )

    def _held_elsewhere_only(self, key: str) -> bool:
        """Whether ``key`` is resident on another live replica and not on this one."""
        if key in self._engine.stats()["resident_adapters"]:
            return False
        return any(key in rep["stats"].get("resident_adapters", ()) for rep in self._replica.peers.values())

    async def _relay(self, request: GenerationRequest, key: str) -> AsyncIterator[GenerationOutput]:
        from ray import serve

        if self._handle is None:
            self._handle = serve.get_deployment_handle(DEPLOYMENT, APP_NAME).options(stream=True)
        stream = self._handle.options(multiplexed_model_id=key).generate.remote(request_payload(request))
        self._relays += 1  # counted once sent (a call Ray refused relays nothing)
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
            logger.error("request %s lost the replica it was relayed to: %r", request.request_id, err)
            raise RequestFailed(request.request_id or "unknown") from err
        finally:
            self._relays -= 1
            stream.cancel()  # the client left early: the replica's generator stops and frees the row


def engine_deployment(engine_config: EngineConfig, replicas: ReplicaConfig) -> Any:
    """The Serve deployment of engine replicas, each the HTTP ingress; its multiplex size is the
    engine's slots, so Ray's LRU and the engine's agree."""
    from ray import serve

    @serve.ingress()
    class EngineReplica(EngineReplicaBase):
        stream_interval = replicas.stream_interval_ms / 1000
        capacity = replica_capacity(engine_config)

        @serve.multiplexed(max_num_models_per_replica=engine_config.max_slots)
        async def adapter(self, model_id: str) -> _Lease:
            return await self._warm(model_id)

    env = {"OMP_NUM_THREADS": str(replicas.threads), "LORA_KIT_HOME": os.environ.get("LORA_KIT_HOME", "")}
    options: dict[str, Any] = {"num_cpus": replicas.replica_cpus, "runtime_env": {"env_vars": env}}
    if replicas.replica_gpus:
        options["num_gpus"] = replicas.replica_gpus
    return serve.deployment(
        EngineReplica,
        name=DEPLOYMENT,
        num_replicas=replicas.replicas,
        ray_actor_options=options,
        # Ray must not hold requests back below what the engine batches and queues itself; Ray's
        # default (5) held 16-row batches to 5 requests: 0.4x one process (BENCHMARKS.md, issue 24).
        max_ongoing_requests=replica_capacity(engine_config),
        health_check_period_s=2,
    )


def build_app(engine_config: EngineConfig, replicas: ReplicaConfig, server: ServerConfig, registry_root: str) -> Any:
    """The Serve application: the engine replicas, each serving the HTTP app."""
    config = dataclasses.replace(engine_config, threads=replicas.threads)
    return engine_deployment(engine_config, replicas).bind(config, server, registry_root)


def replica_capacity(engine_config: EngineConfig) -> int:
    """Requests one engine replica takes at once: its batch and its queue (more would be 429s)."""
    return engine_config.max_batch + engine_config.max_queue


# -- the launcher ----------------------------------------------------------------------------------------


def serve_replicated(server: ServerConfig, engine_config: EngineConfig, replicas: ReplicaConfig) -> int:
    """Start (or join) Ray, deploy ``replicas.replicas`` engine replicas behind Ray's proxy, and serve
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
