"""One resolution per request (issue 26, item 5): a request naming an adapter looks it up in the
registry once, in a worker thread (never on the event loop), and the resolved ``NAME@VERSION``
with its files travels with the request to the engine, which does not look it up again. A real
server on 127.0.0.1 over the tiny Mistral; ``Registry.resolve`` is counted where it runs.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from helpers import make_adapter, registry_engine

from lora_kit.registry import Registry

MODEL = "tiny-mistral"
RUN = f"/client/v4/accounts/acc/ai/run/{MODEL}"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_mistral_dir, word_tokenizer):
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    root = tmp_path_factory.mktemp("resolution")
    reg, engine = registry_engine(root, ("one", "two"), tiny_mistral_dir, word_tokenizer, max_slots=2)
    engine.start()
    app = create_app(engine, reg, ServerConfig(uploads_dir=root / "uploads", max_tokens_cap=2, enable_management=True))
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            yield {"http": http}
    finally:
        engine.stop(10)


@pytest.fixture
def lookups(monkeypatch):
    """Every ``Registry.resolve`` call: (reference, whether it ran on an event loop's thread)."""
    calls: list[tuple[str, bool]] = []
    real = Registry.resolve

    def counting(self, ref):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        calls.append((ref, on_loop))
        return real(self, ref)

    monkeypatch.setattr(Registry, "resolve", counting)
    return calls


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (RUN, {"prompt": "hi", "lora": "one"}, ["one"]),
        (RUN, {"prompt": "hi", "lora": "one", "stream": True}, ["one"]),
        (RUN, {"prompt": "hi", "lora": [{"name": "one", "scale": 0.5}, {"name": "two", "scale": 0.5}]}, ["one", "two"]),
        ("/v1/chat/completions", {"model": "two@1", "messages": [{"role": "user", "content": "hi"}]}, ["two@1"]),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "lora": "two"}, ["two"]),
    ],
)
def test_a_request_resolves_its_adapters_once_off_the_event_loop(world, lookups, path, body, expected):
    resp = world["http"].post(path, json={**body, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert lookups == [(ref, False) for ref in expected]


def test_unknown_and_unloaded_adapters_stay_404(world, lookups):
    http = world["http"]
    missing = http.post(RUN, json={"prompt": "hi", "lora": "nope"})
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == 3037
    assert lookups == [("nope", False)]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "two"}).status_code == 200
    lookups.clear()
    gone = http.post(RUN, json={"prompt": "hi", "lora": "two"})
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == 3037
    assert lookups == []  # an unloaded name is refused before any lookup
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "two"}).status_code == 200


def test_the_engine_uses_the_resolution_a_request_carries(tmp_path, tiny_mistral_dir, word_tokenizer):
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    adapter = make_adapter(tiny_mistral_dir, tmp_path / "a", seed=3)
    looked_up: list[str] = []

    def resolver(ref):
        looked_up.append(ref)
        return "a@1", adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    engine = Engine(
        EngineConfig(model=MODEL, max_slots=2), model=model, tokenizer=word_tokenizer, adapter_resolver=resolver
    )
    try:
        resolved = engine.resolve("a")
        assert resolved.key == "a@1" and looked_up == ["a"]
        ids = word_tokenizer("hello world").input_ids
        carried = GenerationRequest(
            ids, SamplingParams(max_tokens=2), adapter="a@1", resolved_adapters={"a@1": resolved}
        )
        with_resolution = engine.generate_sync(carried)
        assert looked_up == ["a"]  # served from the carried resolution
        without = engine.generate_sync(GenerationRequest(ids, SamplingParams(max_tokens=2), adapter="a@1"))
        assert looked_up == ["a", "a@1"] and without.token_ids == with_resolution.token_ids
    finally:
        engine.stop()
