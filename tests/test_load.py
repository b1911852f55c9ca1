"""Load (issue 12, "make it stay fixed"): a real server on 127.0.0.1 over the tiny random Mistral
and a registry of three adapters takes 64 concurrent requests across both APIs (Cloudflare's run,
OpenAI's chat and text completions), mixed adapters and the base, some streamed, plus streams
whose client disconnects after the first event. Meanwhile ``/healthz`` is polled every 100 ms.

The load also carries one multi-megabyte prompt, refused (400) as too long for the context after
seconds of tokenizing off the event loop. Every other request completes with a 200 (the queue
holds twice the load, so none is refused), every disconnected stream is cancelled in the engine,
``/healthz`` answers throughout, the engine ends idle, and the process's RSS after a measured round
stays within a margin of the RSS after an identical warm-up round (a per-request leak would show).

"The event loop is never blocked" is checked against the load itself, not against a wall-clock
bound that a slower machine would miss: a watcher on the server's own loop records how late each of
its 10 ms sleeps wakes, and the longest stall must stay under half the time the huge prompt's
request took in the same round. Rendered and tokenized on the loop (before issue 12's fix), that
prompt stalls the loop for nearly all of its own handling, so the check fails there, on any machine.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import make_adapter

MODEL = "tiny-mistral"
ACCOUNT = "acc"
RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
ADAPTERS = ("red", "green", "blue")
N_REQUESTS = 64  # concurrent requests that run to the end
N_DISCONNECT = 8  # extra streams whose client leaves after the first event
MAX_TOKENS = 4  # small: the load is in the concurrency, not the length
LONG_TOKENS = 900  # disconnecting streams: far more steps than the disconnect takes to be seen
# 32 messages of 130 KB (each under the schema's 131072-character cap): 4.2 MB and ~700k tokens,
# seconds to render and tokenize, then refused (400) as longer than the model's context.
# Serialized once: encoding it per request would be the test client's work on its own loop.
HUGE_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hello world " * 10_900}] * 32, "max_tokens": MAX_TOKENS}
).encode()
HEALTH_PERIOD_S = 0.1
LOOP_TICK_S = 0.01  # the server-loop watcher's sleep; a stall shows as a late wake-up
# The longest server-loop stall allowed, as a fraction of the huge prompt's own request time in the
# same round: rendered on the loop that stall is ~0.8-1x of it (the rest is upload and parsing);
# off the loop it is the scheduling noise of a busy machine, which slows both sides alike.
MAX_STALL_FRACTION = 0.5
# RSS may grow a little between rounds (allocator arenas, torch caches, httpx pools settling);
# a leak of the prompt, output or KV cache per request would be far bigger across 72 requests.
RSS_MARGIN_BYTES = 64 * 1024 * 1024
ROUND_TIMEOUT_S = 25.0  # one round's client-side bound (each round takes a few seconds)
IDLE_TIMEOUT_S = 15.0  # bound on waiting for the engine to settle after a round


def rss_bytes() -> int:
    """The resident set size of this process (the server runs in it, in a thread), after a full GC
    and, with glibc, ``malloc_trim``: the huge prompt leaves a few hundred MiB of freed memory in
    malloc's arenas, returned to the system or not depending on which worker thread allocated it
    (+-250 MiB between identical rounds without the trim; within ~20 MiB with it)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measure as is
        pass
    try:
        import psutil
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no psutil and no /proc/self/status VmRSS") from None
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_mistral_dir, word_tokenizer):
    """A registry with three adapters, an engine with fewer slots than adapters (so they swap), a server."""
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.registry import Registry
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    root = tmp_path_factory.mktemp("load")
    reg = Registry(root / "registry")
    for seed, name in enumerate(ADAPTERS, start=1):
        reg.register(make_adapter(tiny_mistral_dir, root / name, seed=seed), name)
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    config = EngineConfig(model=MODEL, max_slots=2, max_batch=16, max_queue=2 * (N_REQUESTS + N_DISCONNECT))
    engine = Engine(config, model=model, tokenizer=word_tokenizer, registry_root=reg.root)
    engine.start()
    app = create_app(engine, reg, ServerConfig(uploads_dir=root / "uploads", max_tokens_cap=1000))
    loops: list[asyncio.AbstractEventLoop] = []  # the server's event loop, for the stall watcher

    async def noting_loop(scope, receive, send):  # the app as is, noting the loop it runs on
        if not loops:
            loops.append(asyncio.get_running_loop())
        await app(scope, receive, send)

    try:
        with BackgroundServer(noting_loop) as srv:
            assert httpx.get(srv.url + "/healthz", timeout=30).status_code == 200
            yield engine, srv.url, loops[0]
    finally:
        engine.stop(10)


def spec(i: int) -> dict:
    """The i-th request of a round: API, adapter (or the base), streamed or not."""
    api = ("cloudflare", "chat", "completions")[i % 3]
    lora = (None, *ADAPTERS)[(i // 3) % 4]
    return {"api": api, "lora": lora, "stream": i % 4 == 1}


def route_and_body(api: str, lora: str | None, stream: bool, max_tokens: int) -> tuple[str, dict]:
    common = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if lora is not None:
        common["lora"] = lora
    if api == "cloudflare":
        return RUN, {"prompt": "What is two plus two ?", "raw": True, **common}
    if api == "chat":
        return "/v1/chat/completions", {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello world"}],
            **common,
        }
    return "/v1/completions", {"model": MODEL, "prompt": "And three plus three ?", **common}


def sse_payloads(lines: list[str]) -> list[str]:
    return [line[len("data:") :].strip() for line in lines if line.startswith("data:")]


async def one_request(client: httpx.AsyncClient, i: int) -> str:
    """Run request i to the end; "ok" or "refused" (a clean 429), else an assertion fails."""
    s = spec(i)
    path, body = route_and_body(s["api"], s["lora"], s["stream"], MAX_TOKENS)
    if s["stream"]:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return refused(resp, s)
            lines = [line async for line in resp.aiter_lines()]
        payloads = sse_payloads(lines)
        assert payloads and payloads[-1] == "[DONE]", (s, lines)
        events = [json.loads(p) for p in payloads[:-1]]
        assert not any("error" in e or "errors" in e for e in events), (s, events)
        return "ok"
    resp = await client.post(path, json=body)
    if resp.status_code != 200:
        return refused(resp, s)
    data = resp.json()
    usage = data["result"]["usage"] if s["api"] == "cloudflare" else data["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS, (s, data)
    return "ok"


def refused(resp: httpx.Response, s: dict) -> str:
    """A full queue is the only acceptable non-200: 429, Retry-After, the API's error shape."""
    body = resp.json()
    assert resp.status_code == 429 and resp.headers.get("Retry-After"), (s, resp.status_code, body)
    if s["api"] == "cloudflare":
        assert body["success"] is False and body["errors"][0]["code"] == 3040, body
    else:
        assert body["error"], body
    return "refused"


async def huge_prompt(client: httpx.AsyncClient, took: list[float]) -> str:
    """A body of megabytes whose prompt is too long for the context: a clean 400 envelope.
    Appends the request's time to ``took``."""
    headers = {"Content-Type": "application/json"}
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", content=HUGE_BODY, headers=headers)
    took.append(time.monotonic() - started)
    error = resp.json()["error"]
    assert resp.status_code == 400 and "context" in error["message"], (resp.status_code, error)
    return "too long"


async def disconnecting_stream(client: httpx.AsyncClient, i: int) -> str:
    """A long stream read up to its first event; leaving the block closes the connection."""
    api = ("cloudflare", "chat", "completions")[i % 3]
    lora = (None, *ADAPTERS)[i % 4]
    path, body = route_and_body(api, lora, True, LONG_TOKENS)
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return refused(resp, {"api": api})
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                break
    return "disconnected"


async def poll_health(url: str, stop: asyncio.Event, latencies: list[float]) -> None:
    """GET /healthz every 100 ms on its own connection pool until ``stop`` (bounded by the round)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + ROUND_TIMEOUT_S + IDLE_TIMEOUT_S + 10
        while not stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            resp = await client.get("/healthz")
            latencies.append(time.monotonic() - started)
            assert resp.status_code == 200 and resp.json()["status"] == "ok"
            try:
                await asyncio.wait_for(stop.wait(), HEALTH_PERIOD_S)
            except asyncio.TimeoutError:
                pass


async def watch_stalls(stop: threading.Event, stalls: list[float]) -> None:
    """On the server's loop: sleep LOOP_TICK_S at a time and record how late each wake-up was."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        await asyncio.sleep(LOOP_TICK_S)
        stalls.append(loop.time() - started - LOOP_TICK_S)


async def wait_idle(engine, cancelled_before: int, expected_cancelled: int) -> dict:
    """The engine's stats once nothing runs or waits and the disconnects are all counted (bounded)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        stats = engine.stats()
        cancelled = stats["finished"].get("cancelled", 0) - cancelled_before
        if (stats["running"] == 0 and stats["queue_depth"] == 0 and cancelled >= expected_cancelled) or (
            time.monotonic() > deadline
        ):
            return stats
        await asyncio.sleep(0.05)


async def load_round(engine, url: str, server_loop: asyncio.AbstractEventLoop) -> dict:
    """One round: 64 requests + the disconnecting streams at once, /healthz polled and the server's
    loop watched throughout."""
    cancelled_before = engine.stats()["finished"].get("cancelled", 0)
    latencies: list[float] = []
    stalls: list[float] = []
    huge_took: list[float] = []
    stop = asyncio.Event()
    stop_watch = threading.Event()
    watcher = asyncio.run_coroutine_threadsafe(watch_stalls(stop_watch, stalls), server_loop)
    limits = httpx.Limits(max_connections=N_REQUESTS + N_DISCONNECT, max_keepalive_connections=N_REQUESTS)
    async with httpx.AsyncClient(base_url=url, timeout=ROUND_TIMEOUT_S, limits=limits) as client:
        poller = asyncio.create_task(poll_health(url, stop, latencies))
        try:
            jobs = [one_request(client, i) for i in range(N_REQUESTS)]
            jobs += [disconnecting_stream(client, i) for i in range(N_DISCONNECT)]
            jobs.append(huge_prompt(client, huge_took))
            outcomes = await asyncio.wait_for(asyncio.gather(*jobs), ROUND_TIMEOUT_S)
            disconnected = outcomes.count("disconnected")
            stats = await wait_idle(engine, cancelled_before, disconnected)
        finally:
            stop.set()
            stop_watch.set()
            await poller  # re-raises a failed /healthz
            await asyncio.wrap_future(watcher)
    return {
        "ok": outcomes[:N_REQUESTS].count("ok"),
        "refused": outcomes.count("refused"),
        "disconnected": disconnected,
        "too long": outcomes.count("too long"),
        "cancelled": stats["finished"].get("cancelled", 0) - cancelled_before,
        "stats": stats,
        "latencies": latencies,
        "stalls": stalls,
        "huge_took": huge_took[0],
    }


def check_round(result: dict) -> None:
    stats = result["stats"]
    assert result["ok"] + result["refused"] + result["disconnected"] == N_REQUESTS + N_DISCONNECT, result
    assert result["too long"] == 1, result
    # max_queue is twice the load: every request runs, none is refused.
    assert result["ok"] == N_REQUESTS and result["refused"] == 0, result
    # Every disconnected stream was cancelled in the engine (none ran on to its 900 tokens).
    assert result["cancelled"] == result["disconnected"] > 0, result
    assert stats["running"] == 0 and stats["queue_depth"] == 0, stats
    assert len(result["latencies"]) >= 3, result["latencies"]  # /healthz answered throughout the round
    stalls = result["stalls"]
    assert len(stalls) >= 10, stalls  # the watcher ran throughout the round
    worst, bound = max(stalls), MAX_STALL_FRACTION * result["huge_took"]
    assert worst < bound, (
        f"the server's event loop stalled {worst:.2f}s, over half the huge prompt's {result['huge_took']:.2f}s "
        f"(rendered on the loop?); /healthz worst {max(result['latencies']):.2f}s"
    )


def test_concurrent_mixed_load_with_disconnects(server):
    engine, url, server_loop = server
    with httpx.Client(base_url=url, timeout=60) as http:  # one-time costs first: kernels, adapter files
        for lora in (None, *ADAPTERS):
            path, body = route_and_body("cloudflare", lora, False, MAX_TOKENS)
            assert http.post(path, json=body).status_code == 200
    warm = asyncio.run(load_round(engine, url, server_loop))  # the same load: grows pools, arenas and caches
    check_round(warm)
    before = rss_bytes()
    measured = asyncio.run(load_round(engine, url, server_loop))
    check_round(measured)
    after = rss_bytes()
    grown = after - before
    assert grown < RSS_MARGIN_BYTES, f"RSS grew {grown / 2**20:.1f} MiB over one round of {N_REQUESTS} requests"
