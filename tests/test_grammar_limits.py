"""Limits on what one request's output grammar or prompt can cost everyone else (issue 12, defect 2).

A schema is untrusted input: its JSON is capped in size, it must compile within a time budget
(else a 400 naming ``response_format`` or ``tools``), compiling never runs on the server's
event loop (``/healthz`` answers while a grammar compiles or a huge prompt is tokenized), and the
compiled-grammar cache is a bounded LRU. Slow work is simulated by compilers and renderers that
wait on an event, so nothing here depends on how fast this machine is.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ACCOUNT = "acc"
MODEL = "tiny-mistral"
RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
HEALTH_TIMEOUT_S = 5.0  # generous: /healthz does no work; blocked, it would wait for the whole slow compile


def schema(i: int) -> dict:
    return {"type": "object", "properties": {f"field{i}": {"type": "integer"}}, "required": [f"field{i}"]}


def huge_schema() -> dict:
    """A valid schema whose JSON is over the 64 KiB cap (an enum of 8000 strings)."""
    return {"type": "string", "enum": [f"value-{i:06d}" for i in range(8000)]}


class GatedCompiler:
    """Wraps an xgrammar compiler: compiling a schema whose JSON contains ``marker`` waits for ``gate``."""

    def __init__(self, inner, marker: str = "slow") -> None:
        self.inner, self.marker = inner, marker
        self.gate = threading.Event()
        self.waiting = 0

    def compile_json_schema(self, source, **kw):
        if self.marker in source:
            self.waiting += 1
            self.gate.wait(60)
        return self.inner.compile_json_schema(source, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# -- the grammar cache, in-process ------------------------------------------------------------------


@pytest.fixture()
def make_cache(word_tokenizer):
    from lora_kit.engine.constraints import GrammarCache

    def make(**limits):
        return GrammarCache(word_tokenizer, len(word_tokenizer), [2], **limits)

    return make


def json_format(s: dict) -> dict:
    return {"type": "json_schema", "json_schema": s}


def test_cache_is_a_bounded_lru(make_cache):
    cache = make_cache(max_entries=4)
    for i in range(12):
        assert cache.constraint(json_format(schema(i)), None) is not None
        if i == 5:
            cache.constraint(json_format(schema(2)), None)  # used again: stays in the cache
        assert len(cache) <= 4
    assert len(cache) == 4
    keys = list(cache._compiled)
    assert any('"field11"' in k for k in keys)  # the newest is kept
    assert not any('"field0"' in k for k in keys)  # the oldest is gone

    by_bytes = make_cache(max_bytes=1)  # every grammar is over the byte budget: only the newest stays
    for i in range(5):
        by_bytes.constraint(json_format(schema(i)), None)
    assert len(by_bytes) == 1


def test_schema_over_the_size_cap_is_refused_naming_the_field(make_cache):
    from lora_kit.engine.constraints import GrammarError

    cache = make_cache()
    with pytest.raises(GrammarError, match="response_format.*limit") as err:
        cache.constraint(json_format(huge_schema()), None)
    assert err.value.field == "response_format"
    tool = {"type": "function", "function": {"name": "pick", "parameters": huge_schema()}}
    with pytest.raises(GrammarError, match="tools.*limit") as err:
        cache.constraint(None, [tool], "required")
    assert err.value.field == "tools"
    assert len(cache) == 0


def test_a_slow_compile_times_out_without_blocking_other_schemas(make_cache):
    from lora_kit.engine.constraints import GrammarError

    cache = make_cache(timeout_s=0.5, workers=2)
    gated = cache.compiler = GatedCompiler(cache.compiler)
    slow = json_format({"type": "object", "properties": {"slow": {"type": "string"}}})
    try:
        with pytest.raises(GrammarError, match="response_format.*did not compile within") as err:
            cache.constraint(slow, None)
        assert err.value.field == "response_format"
        # The same schema again waits for the compile already running; it does not start a second one.
        with pytest.raises(GrammarError):
            cache.constraint(slow, None)
        assert gated.waiting == 1
        # The runaway compile holds one worker; another schema compiles in the other.
        assert cache.constraint(json_format(schema(1)), None) is not None
        # Concurrency is capped: with both workers stuck, a third schema is refused after the budget.
        stuck = json_format({"type": "object", "properties": {"slow2": {"type": "string"}}})
        with pytest.raises(GrammarError):
            cache.constraint(stuck, None)
        with pytest.raises(GrammarError):
            cache.constraint(json_format(schema(2)), None)
        assert gated.waiting == 2
    finally:
        gated.gate.set()
    # Once the abandoned compile ends, its grammar is cached and served.
    deadline = time.monotonic() + 30
    while len(cache) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.constraint(slow, None) is not None


# -- a real server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_mistral_dir, word_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.registry import Registry
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    def no_adapters(ref):
        raise KeyError(ref)

    root = tmp_path_factory.mktemp("grammar-limits")
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    engine = Engine(EngineConfig(model=MODEL), model=model, tokenizer=word_tokenizer, adapter_resolver=no_adapters)
    engine.start()
    app = create_app(engine, Registry(root / "registry"), ServerConfig(uploads_dir=root / "uploads", max_tokens_cap=8))
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as client:
        yield engine, client
    engine.stop(10)


def healthz_answers(client) -> bool:
    return client.get("/healthz", timeout=HEALTH_TIMEOUT_S).status_code == 200


def test_healthz_answers_while_a_grammar_compiles_and_the_budget_is_a_400(server):
    engine, client = server
    cache = engine._grammar_cache()
    cache.timeout_s = 20.0  # the request waits on the gate, well past the /healthz check
    gated = cache.compiler = GatedCompiler(cache.compiler)
    body = {
        "prompt": "hello world",
        "max_tokens": 2,
        "response_format": {"type": "json_schema", "json_schema": {"type": "object", "properties": {"slow": {}}}},
    }
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.post, RUN, json=body)
            deadline = time.monotonic() + 30
            while gated.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert gated.waiting == 1, "the request never reached the compiler"
            assert healthz_answers(client)  # the event loop is free while the grammar compiles
            assert client.post(RUN, json={"prompt": "hello world", "max_tokens": 2}).status_code == 200
            cache.timeout_s = 0.5  # the next request of the same schema gives up after the budget
            late = client.post(RUN, json=body)
            gated.gate.set()
            pending.result(60)
    finally:
        gated.gate.set()
        cache.compiler = gated.inner
        cache.timeout_s = 10.0
    assert late.status_code == 400
    err = late.json()["errors"][0]
    assert err["code"] == 5006 and "response_format" in err["message"] and "did not compile" in err["message"]
    oa = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": huge_schema()}},
        },
    )
    assert oa.status_code == 400
    assert oa.json()["error"]["type"] == "invalid_request_error"
    assert oa.json()["error"]["param"] == "response_format"


def test_schema_over_the_size_cap_is_a_400_on_both_apis(server):
    _, client = server
    fmt = {"type": "json_schema", "json_schema": huge_schema()}
    cf = client.post(RUN, json={"prompt": "hello", "response_format": fmt})
    assert cf.status_code == 400
    err = cf.json()["errors"][0]
    assert err["code"] == 5006 and "response_format" in err["message"] and "limit" in err["message"]
    tool = {"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": {}}}}
    tool["function"]["parameters"]["properties"] = {"choice": huge_schema()}
    tools = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "tools": [tool]},
    )
    assert tools.status_code == 400
    assert tools.json()["error"]["type"] == "invalid_request_error"
    assert tools.json()["error"]["param"] == "tools"


def test_healthz_answers_while_a_huge_prompt_is_tokenized(server, monkeypatch):
    from lora_kit import chat

    _, client = server
    gate, entered = threading.Event(), threading.Event()
    render_prompt = chat.render_prompt

    def slow_render(tokenizer, prompt, raw=False):
        if prompt.startswith("slow"):
            entered.set()
            gate.wait(60)
        return render_prompt(tokenizer, prompt, raw=raw)

    monkeypatch.setattr(chat, "render_prompt", slow_render)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.post, RUN, json={"prompt": "slow hello world", "max_tokens": 2})
            assert entered.wait(30), "the request never reached the renderer"
            assert healthz_answers(client)  # the event loop is free while the prompt is tokenized
            gate.set()
            assert pending.result(60).status_code == 200
    finally:
        gate.set()
