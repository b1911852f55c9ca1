"""The HTTP server, end to end: a real uvicorn server on 127.0.0.1 over the real engine (embedded
SmolLM2-135M-Instruct) and a real registry holding two random PEFT adapters, called with the
official ``cloudflare`` and ``openai`` SDKs and raw httpx. Greedy decoding and small
``max_tokens`` keep it fast on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import ACCOUNT, MODEL, QUESTION, RUN, make_embedded_adapter, sse_payloads


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Registry with adapters ``alpha`` and ``beta``; one engine; an open server and a token server."""
    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.registry import Registry
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    root = tmp_path_factory.mktemp("server")
    registry = Registry(root / "registry")
    dirs = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        dirs[name] = make_embedded_adapter(root / f"adapter-{name}", seed)
        registry.register(dirs[name], name, base_model=MODEL, description=f"random adapter {name}")
    # Exact fp32 on every CPU: these tests compare answers token for token (solo, batched, repeated,
    # with a cached prompt prefix), which the 16-bit weights `auto` picks on an AMX CPU do not promise.
    config = EngineConfig(MODEL, max_slots=4, max_batch=8, max_queue=64, weight_dtype="float32")
    engine = Engine(config, registry_root=registry.root)
    engine.start()
    # Open and managed (a loopback test server), loading adapter directories from under ``root``.
    app = create_app(
        engine,
        registry,
        ServerConfig(uploads_dir=root / "uploads", max_tokens_cap=64, enable_management=True, adapter_roots=[root]),
    )
    locked = create_app(
        engine, registry, ServerConfig(api_token="s3cret", uploads_dir=root / "uploads", max_body_bytes=4096)
    )
    with BackgroundServer(app) as open_srv, BackgroundServer(locked) as token_srv:
        yield {
            "engine": engine,
            "registry": registry,
            "url": open_srv.url,
            "token_url": token_srv.url,
            "dirs": dirs,
            "root": root,
        }
    engine.stop(10)


@pytest.fixture(scope="module")
def cf(world):
    from cloudflare import Cloudflare

    return Cloudflare(api_token="x", base_url=world["url"] + "/client/v4", max_retries=0)


@pytest.fixture(scope="module")
def oa(world):
    from openai import OpenAI

    return OpenAI(base_url=world["url"] + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def http(world):
    with httpx.Client(base_url=world["url"], timeout=120) as client:
        yield client


def run_raw(http, body, model=MODEL):
    return http.post(RUN + model, json=body)


@pytest.fixture(scope="module")
def solo(cf):
    """Greedy results for QUESTION (6 tokens) for the base and both adapters, one request at a time."""
    out = {}
    for lora in (None, "alpha", "beta"):
        extra = {"lora": lora} if lora else {}
        out[lora] = cf.ai.run(MODEL, account_id=ACCOUNT, messages=QUESTION, max_tokens=6, temperature=0, **extra)
    return {k: v["response"] for k, v in out.items()} | {"base-result": out[None]}


# -- Cloudflare route -----------------------------------------------------------------------------


def test_both_body_forms_and_envelope(http, cf, solo):
    base = solo["base-result"]
    assert base["response"] == "The capital of France is Paris"  # (+ "." as the 7th token)
    assert base["usage"]["completion_tokens"] == 6
    assert base["usage"]["total_tokens"] == base["usage"]["prompt_tokens"] + 6
    # The prompt form is one user turn: it renders exactly like the messages form.
    prompt = cf.ai.run(MODEL, account_id=ACCOUNT, prompt=QUESTION[0]["content"], max_tokens=6, temperature=0)
    assert prompt == base

    # Cloudflare's curl examples send JSON without a JSON content type; the envelope is exact.
    resp = http.post(
        RUN + MODEL,
        content=json.dumps({"messages": QUESTION, "max_tokens": 6, "temperature": 0}),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 200
    assert resp.json() == {"result": base, "success": True, "errors": [], "messages": []}

    # raw passes the text through untouched (no template: fewer prompt tokens); "true" works like true.
    raw = run_raw(http, {"prompt": QUESTION[0]["content"], "raw": "true", "max_tokens": 2, "temperature": 0})
    raw_bool = run_raw(http, {"prompt": QUESTION[0]["content"], "raw": True, "max_tokens": 2, "temperature": 0})
    assert raw.status_code == 200 and raw.json() == raw_bool.json()
    assert raw.json()["result"]["usage"]["prompt_tokens"] < base["usage"]["prompt_tokens"]


def test_lora_selects_adapters_and_model_names(http, cf, solo):
    assert len({solo[None], solo["alpha"], solo["beta"]}) == 3
    # Same adapter + greedy = same answer; the SDK sends the model as "@cf%2Fhuggingface%2F<name>".
    again = cf.ai.run(
        f"@cf/huggingface/{MODEL}", account_id=ACCOUNT, messages=QUESTION, max_tokens=6, temperature=0, lora="alpha"
    )
    assert again["response"] == solo["alpha"]
    # Literal slashes (curl), the prompt form, and a NAME@VERSION reference.
    literal = run_raw(
        http,
        {"prompt": QUESTION[0]["content"], "lora": "beta@1", "max_tokens": 6, "temperature": 0},
        model=f"@cf/huggingface/{MODEL}",
    )
    assert literal.json()["result"]["response"] == solo["beta"]
    encoded = http.post(
        RUN + f"@cf%2Fhuggingface%2F{MODEL}",
        json={"messages": QUESTION, "max_tokens": 6, "temperature": 0, "lora": "beta"},
    )
    assert encoded.json()["result"]["response"] == solo["beta"]


def test_unknown_lora_and_model_are_errors(cf, http):
    import cloudflare

    with pytest.raises(cloudflare.NotFoundError) as err:
        cf.ai.run(MODEL, account_id=ACCOUNT, messages=QUESTION, max_tokens=4, lora="nope")
    assert err.value.status_code == 404
    assert err.value.body["errors"][0]["code"] == 3037
    resp = run_raw(http, {"prompt": "hi", "lora": "nope"})
    body = resp.json()
    assert resp.status_code == 404 and body["result"] is None and body["success"] is False and body["messages"] == []
    assert body["errors"][0]["code"] == 3037 and "nope" in body["errors"][0]["message"]

    with pytest.raises(cloudflare.BadRequestError) as err:
        cf.ai.run("@cf/mistral/mistral-7b-instruct-v0.1", account_id=ACCOUNT, prompt="hi")
    assert err.value.body["errors"][0]["code"] == 5007
    assert run_raw(http, {"prompt": "hi"}, model="other-model").json()["errors"][0]["code"] == 5007


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"temperature": 5.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 2.5}, "top_p"),
        ({"top_p": -1}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 51}, "top_k"),
        ({"seed": 0}, "seed"),
        ({"seed": 10_000_000_000}, "seed"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"raw": "maybe"}, "raw"),
        ({"stream": "yes"}, "stream"),
        ({"lora": ""}, "lora"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}], "tools": [{"name": "f"}]}, "tools[0]"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 131073}, "prompt"),
    ],
)
def test_range_violations_name_the_field(http, patch, field):
    body = {"prompt": "hi"} if "messages" not in patch else {}
    body.update(patch)
    resp = run_raw(http, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()
    assert err["success"] is False and err["result"] is None
    assert err["errors"][0]["code"] == 5006
    assert err["errors"][0]["message"].startswith(field) or f"{field}:" in err["errors"][0]["message"], err


def test_bad_bodies_are_400_in_the_envelope(http):
    for content in (b"{not json", b"", b"[1, 2]"):
        resp = http.post(RUN + MODEL, content=content, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400
        assert resp.json()["errors"][0]["code"] == 5006
        assert resp.json()["success"] is False
    both = run_raw(http, {"prompt": "a", "messages": QUESTION})
    assert both.status_code == 400 and "not both" in both.json()["errors"][0]["message"]
    neither = run_raw(http, {"max_tokens": 3})
    assert neither.status_code == 400 and "'prompt'" in neither.json()["errors"][0]["message"]
    # The messages form always applies the chat template; a conversation it cannot render is bad input.
    bad_turns = run_raw(http, {"messages": [{"role": "assistant", "content": "hi"}]})
    assert bad_turns.status_code == 400 and bad_turns.json()["errors"][0]["message"].startswith("messages:")
    no_route = http.get("/client/v4/nothing/here")
    assert no_route.status_code == 404 and no_route.json()["errors"][0]["code"] == 7003


def test_streaming_sse_framing_and_equality(http, cf, solo):
    body = {"messages": QUESTION, "max_tokens": 6, "temperature": 0, "stream": True, "lora": "alpha"}
    with http.stream("POST", RUN + MODEL, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    # Every event is one "data: ..." line followed by a blank line; the stream ends with [DONE].
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1])
    events = sse_payloads(raw)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["response"] == "" and final["usage"]["completion_tokens"] == 6
    deltas = events[:-2]
    assert deltas and all(set(e) == {"response"} for e in deltas)
    assert "".join(e["response"] for e in deltas) == solo["alpha"]

    # The official SDK streams through with_streaming_response.
    with cf.ai.with_streaming_response.run(
        MODEL, account_id=ACCOUNT, prompt=QUESTION[0]["content"], stream=True, max_tokens=6, temperature=0
    ) as sdk_resp:
        lines = [line for line in sdk_resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["response"] for line in lines[:-1])
    assert text == solo[None]


def test_seed_reproduces_sampling(cf):
    def sample(seed):
        return cf.ai.run(
            MODEL, account_id=ACCOUNT, messages=QUESTION, max_tokens=6, temperature=1.5, seed=seed, top_k=40, top_p=0.95
        )["response"]

    samples = {seed: sample(seed) for seed in (1, 2, 3)}
    assert sample(1) == samples[1]  # the same seed again: the same sample
    # Other seeds draw other samples: the seed reaches the sampler, and so does the temperature
    # (greedy would give one answer for every seed).
    assert len(set(samples.values())) > 1, samples


SCHEMA = {
    "type": "object",
    "properties": {"capital": {"type": "string", "enum": ["Paris", "Lyon", "Rome"]}, "sure": {"type": "boolean"}},
    "required": ["capital", "sure"],
    "additionalProperties": False,
}


def check_schema(obj):
    assert set(obj) == {"capital", "sure"}
    assert obj["capital"] in ("Paris", "Lyon", "Rome") and isinstance(obj["sure"], bool)


def test_json_schema_output_validates(cf, oa):
    result = cf.ai.run(
        MODEL,
        account_id=ACCOUNT,
        messages=QUESTION,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": SCHEMA},
    )
    # JSON mode: Workers AI returns the parsed object as `response`.
    check_schema(result["response"])
    chat = oa.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
    )
    check_schema(json.loads(chat.choices[0].message.content))


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_calls_parse(http, oa):
    flat = {
        "name": "get_weather",
        "description": "Get the current weather of a city",
        "parameters": WEATHER_TOOL["function"]["parameters"],
    }
    resp = run_raw(
        http, {"messages": WEATHER_Q, "tools": [flat], "tool_choice": "required", "max_tokens": 40, "temperature": 0}
    )
    result = resp.json()["result"]
    assert resp.status_code == 200
    assert result["response"] == ""
    [call] = result["tool_calls"]
    assert call["name"] == "get_weather" and isinstance(call["arguments"], dict)
    assert isinstance(call["arguments"]["city"], str)

    chat = oa.chat.completions.create(
        model=MODEL, messages=WEATHER_Q, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=40, temperature=0
    )
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls"
    [oa_call] = choice.message.tool_calls
    assert oa_call.function.name == "get_weather"
    assert json.loads(oa_call.function.arguments) == call["arguments"]  # same rendering, same greedy decode


# -- OpenAI-compatible ------------------------------------------------------------------------------


def test_openai_models_and_chat(oa, solo):
    models = {m.id: m for m in oa.models.list().data}
    assert MODEL in models
    for name in ("alpha", "alpha@1", "beta", "beta@1"):
        assert models[name].model_extra["parent"] == MODEL

    by_model = oa.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=6, temperature=0)
    assert by_model.choices[0].message.content == solo["alpha"]
    assert by_model.model == "alpha" and by_model.choices[0].finish_reason == "length"
    assert by_model.usage.completion_tokens == 6
    by_lora = oa.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, extra_body={"lora": "beta"}
    )
    assert by_lora.choices[0].message.content == solo["beta"]

    stream = oa.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == solo[None]
    assert chunks[-1].usage.completion_tokens == 6


def test_openai_completions(oa):
    prompt = "The capital of France is"
    done = oa.completions.create(model="alpha", prompt=prompt, max_tokens=4, temperature=0)
    text = done.choices[0].text
    assert text and done.usage.completion_tokens == 4 and done.object == "text_completion"
    streamed = "".join(
        c.choices[0].text
        for c in oa.completions.create(
            model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stream=True, extra_body={"lora": "alpha"}
        )
    )
    assert streamed == text


def test_ignore_eos_generates_exactly_max_tokens(oa):
    # A two-word answer ends at EOS; with vLLM's ignore_eos extension it runs to max_tokens.
    short = oa.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=60, temperature=0)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 60
    full = oa.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=60, temperature=0, extra_body={"ignore_eos": True}
    )
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 60


def test_openai_errors(oa):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        oa.chat.completions.create(model="no-such-adapter", messages=QUESTION, max_tokens=4)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=9)
    assert "temperature" in err.value.body["message"]


# -- concurrency, queueing ------------------------------------------------------------------------


def test_concurrent_mixed_adapters_match_solo(cf, solo):
    loras = [None, "alpha", "beta", "alpha", None, "beta"]

    def ask(lora):
        extra = {"lora": lora} if lora else {}
        return cf.ai.run(MODEL, account_id=ACCOUNT, messages=QUESTION, max_tokens=6, temperature=0, **extra)["response"]

    with ThreadPoolExecutor(len(loras)) as pool:
        answers = list(pool.map(ask, loras))
    assert answers == [solo[lora] for lora in loras]


MIX = [{"name": "alpha", "scale": 0.5}, {"name": "beta", "scale": 0.5}]


def test_weighted_mix_in_lora_on_both_apis(world, http, cf, oa, solo):
    from lora_kit import chat
    from lora_kit.engine import AdapterWeight, GenerationRequest, SamplingParams

    # What the engine answers for the mix of the canonical versions, straight from Python.
    engine = world["engine"]
    ids = chat.render(engine.tokenizer, QUESTION, add_generation_prompt=True).input_ids
    mix = [AdapterWeight("alpha@1", 0.5), AdapterWeight("beta@1", 0.5)]
    want = engine.generate_sync(GenerationRequest(ids, SamplingParams(max_tokens=6), adapter=mix)).text

    def run(lora):
        return cf.ai.run(MODEL, account_id=ACCOUNT, messages=QUESTION, max_tokens=6, temperature=0, lora=lora)

    assert run(MIX)["response"] == want
    assert run([{"name": "alpha", "scale": 1.0}])["response"] == solo["alpha"]  # one at scale 1: the adapter
    chat_reply = oa.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, extra_body={"lora": MIX}
    )
    assert chat_reply.choices[0].message.content == want
    stream = run_raw(http, {"messages": QUESTION, "max_tokens": 6, "temperature": 0, "lora": MIX, "stream": True})
    assert "".join(p["response"] for p in sse_payloads(stream.text) if isinstance(p, dict)) == want
    assert (
        'lora_kit_requests_total{adapter="alpha@1+beta@1",route="cloudflare.run",status="200"}'
        in http.get("/metrics").text
    )


@pytest.mark.parametrize(
    "lora, status, says",
    [
        ([{"name": "alpha", "scale": 0.2}] * 5, 400, "lora"),
        ([], 400, "lora"),
        ([{"name": "alpha", "scale": 2.5}], 400, "lora"),
        ([{"name": "alpha", "weight": 0.5}], 400, "lora"),
        ([{"name": "alpha", "scale": 0.5}, {"name": "nope", "scale": 0.5}], 404, "nope"),
    ],
)
def test_weighted_mix_limits(http, oa, lora, status, says):
    import openai

    resp = run_raw(http, {"prompt": "hi", "max_tokens": 2, "lora": lora})
    assert resp.status_code == status, resp.text
    error = resp.json()["errors"][0]
    assert error["code"] == (3037 if status == 404 else 5006) and says in error["message"]
    with pytest.raises(openai.NotFoundError if status == 404 else openai.BadRequestError):
        oa.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, extra_body={"lora": lora})


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def test_429_when_queue_full_and_disconnect_frees_place(world):
    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    engine = Engine(EngineConfig(MODEL, max_batch=1, max_queue=1), registry_root=world["registry"].root)
    engine.start()
    # The request holding the only batch place must not end before its client leaves: with
    # ignore_eos and no cap it decodes to the model's context (8192 tokens, minutes of decoding),
    # while this test needs it for seconds. Its end is the disconnect, whatever the machine's speed.
    endless = 10**9
    app = create_app(
        engine, world["registry"], ServerConfig(uploads_dir=world["root"] / "uploads", max_tokens_cap=endless)
    )
    holding = {"messages": QUESTION, "max_tokens": endless, "temperature": 0, "stream": True, "ignore_eos": True}
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as client:
            with client.stream("POST", RUN + MODEL, json=holding) as running:
                assert running.status_code == 200
                # Keep the iterator: a dropped one is closed by the garbage collector, and httpcore
                # then closes the connection, so the server (rightly) cancels the running request.
                lines = running.iter_lines()
                next(lines)  # decoding has started: it holds the only batch place
                result = {}

                def queued():
                    body = {"messages": QUESTION, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
                    result["resp"] = client.post(RUN + MODEL, json=body)

                waiter = threading.Thread(target=queued)
                waiter.start()
                wait_for(lambda: engine.stats()["queue_depth"] == 1)
                rejected = client.post(RUN + MODEL, json={"prompt": "hi", "max_tokens": 2})
                assert rejected.status_code == 429
                assert rejected.headers["retry-after"] == "1"
                assert rejected.json()["errors"][0]["code"] == 3040
                assert engine.stats()["finished"] == {}  # the place is still held, by the endless request
            # The streaming client went away: its request is cancelled, its place frees and the
            # queued request completes.
            waiter.join(120)
            assert result["resp"].status_code == 200
            assert result["resp"].json()["result"]["usage"]["completion_tokens"] == 2
            wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["queue_depth"] == 0)
            assert engine.stats()["finished"] == {"cancelled": 1, "length": 1}
    finally:
        engine.stop(10)


# -- auth, limits, operations ---------------------------------------------------------------------


def test_runtime_load_and_unload_lora_adapter(world, http, cf):
    import openai

    registry, engine = world["registry"], world["engine"]
    gamma = make_embedded_adapter(world["root"] / "adapter-gamma", 3)
    load = {"lora_name": "gamma", "lora_path": str(gamma)}
    for _ in range(2):  # loading the same files twice adds no version
        resp = http.post("/v1/load_lora_adapter", json=load)
        assert resp.status_code == 200 and resp.text == "Success: LoRA adapter 'gamma' added successfully."
    assert [v.ref for v in registry.list() if v.name == "gamma"] == ["gamma@1"]
    assert "gamma@1" in engine.stats()["resident_adapters"]  # warmed
    answer = run(cf, "gamma")
    # Unloaded: every reference of the name is 3037/404, and its slot is free.
    resp = http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert resp.status_code == 200 and "removed" in resp.text
    assert "gamma@1" not in engine.stats()["resident_adapters"]
    for ref in ("gamma", "gamma@1"):
        gone = run_raw(http, {"prompt": "hi", "max_tokens": 2, "lora": ref})
        assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == 3037, gone.text
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=world["url"] + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="gamma", messages=QUESTION, max_tokens=2
        )
    assert "gamma@1" not in engine.stats()["resident_adapters"]  # the refused requests loaded nothing
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 404
    # Loading by name alone serves the registry's version again, with the same answer.
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
    assert run(cf, "gamma") == answer
    for body, status in [
        ({"lora_name": "delta", "lora_path": "relative/dir"}, 400),
        ({"lora_name": "delta", "lora_path": str(world["root"] / "missing")}, 400),
        ({"lora_name": "delta"}, 400),  # not in the registry and no path
        ({"lora_name": "../x", "lora_path": str(gamma)}, 400),  # not a valid name
        ({"lora_path": str(gamma)}, 400),
    ]:
        resp = http.post("/v1/load_lora_adapter", json=body)
        assert resp.status_code == status, (body, resp.text)
        assert str(world["root"]) not in resp.text and "relative/dir" not in resp.text, resp.text  # no path echoed
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "never"}).status_code == 404
    with httpx.Client(base_url=world["token_url"], timeout=60) as locked:
        assert locked.post("/v1/load_lora_adapter", json=load).status_code == 401
        assert locked.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 401


def run(cf, lora):
    return cf.ai.run(MODEL, account_id=ACCOUNT, messages=QUESTION, max_tokens=6, temperature=0, lora=lora)["response"]


def test_auth(world):
    import cloudflare
    import openai

    url = world["token_url"]
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
    with httpx.Client(base_url=url, timeout=60) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            resp = client.post(RUN + MODEL, json=body, headers=headers)
            assert resp.status_code == 401
            assert resp.json() == {
                "result": None,
                "success": False,
                "messages": [],
                "errors": [{"code": 10000, "message": "Authentication error"}],
            }
        assert client.get(f"/client/v4/accounts/{ACCOUNT}/ai/finetunes").status_code == 401
        assert client.get("/v1/models").status_code == 401
        assert client.get("/healthz").status_code == 200
        ok = client.post(RUN + MODEL, json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["success"] is True
        # The body limit of this server is 4096 bytes.
        big = client.post(RUN + MODEL, json={"prompt": "x" * 5000}, headers={"Authorization": "Bearer s3cret"})
        assert big.status_code == 413 and big.json()["errors"][0]["code"] == 3006
    with pytest.raises(cloudflare.AuthenticationError):
        cloudflare.Cloudflare(api_token="wrong", base_url=url + "/client/v4", max_retries=0).ai.run(
            MODEL, account_id=ACCOUNT, prompt="hi"
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = cloudflare.Cloudflare(api_token="s3cret", base_url=url + "/client/v4", max_retries=0)
    assert (
        good.ai.run(MODEL, account_id=ACCOUNT, prompt="hi", max_tokens=2, temperature=0)["usage"]["completion_tokens"]
        == 2
    )


def test_finetune_upload_through_the_sdk(cf, world, solo):
    import cloudflare

    created = cf.ai.finetunes.create(
        account_id=ACCOUNT, model=f"@cf/huggingface/{MODEL}", name="uploaded", description="alpha, uploaded"
    )
    src = world["dirs"]["alpha"]
    with open(src / "adapter_config.json", "rb") as fh:
        cf.ai.finetunes.assets.create(created.id, account_id=ACCOUNT, file=fh, file_name="adapter_config.json")
    # Half uploaded: naming it is error 3039, by name and by id.
    for ref in ("uploaded", created.id):
        with pytest.raises(cloudflare.BadRequestError) as err:
            cf.ai.run(MODEL, account_id=ACCOUNT, messages=QUESTION, max_tokens=4, lora=ref)
        assert err.value.body["errors"][0]["code"] == 3039
    with open(src / "adapter_model.safetensors", "rb") as fh:
        cf.ai.finetunes.assets.create(created.id, account_id=ACCOUNT, file=fh, file_name="adapter_model.safetensors")
    listed = cf.ai.finetunes.list(account_id=ACCOUNT)
    names = {row.name for row in (listed if isinstance(listed, list) else [listed])}
    assert {"alpha", "beta", "uploaded"} <= names
    # The uploaded files are alpha's: same weights, same greedy answer, by name and by fine-tune id.
    for ref in ("uploaded", created.id):
        out = cf.ai.run(MODEL, account_id=ACCOUNT, messages=QUESTION, max_tokens=6, temperature=0, lora=ref)
        assert out["response"] == solo["alpha"]

    # An invalid adapter is refused with the registry's reason.
    bad = cf.ai.finetunes.create(account_id=ACCOUNT, model=MODEL, name="broken")
    cf.ai.finetunes.assets.create(
        bad.id, account_id=ACCOUNT, file=("c.json", b'{"peft_type": "LORA"}'), file_name="adapter_config.json"
    )
    with pytest.raises(cloudflare.BadRequestError) as err:
        cf.ai.finetunes.assets.create(
            bad.id, account_id=ACCOUNT, file=("w", b"not safetensors"), file_name="adapter_model.safetensors"
        )
    assert "refused" in err.value.body["errors"][0]["message"]


def test_metrics_and_healthz(world, http, solo):
    assert run_raw(http, {"prompt": "hi", "lora": "missing"}).status_code == 404
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    text = http.get("/metrics").text
    assert 'lora_kit_requests_total{adapter="alpha@1",route="cloudflare.run",status="200"}' in text
    assert 'lora_kit_generated_tokens_total{adapter="beta@1"}' in text
    assert "lora_kit_time_to_first_token_seconds_bucket" in text
    assert "lora_kit_queue_depth 0" in text
    assert "lora_kit_resident_adapters" in text
    assert 'lora_kit_request_errors_total{code="3037",route="cloudflare.run"}' in text
    prefix = 'lora_kit_engine_finished_total{reason="'
    exported = {
        line[len(prefix) :].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }
    finished = world["engine"].stats()["finished"]
    assert finished.get("stop", 0) + finished.get("length", 0) > 0
    assert exported == {reason: float(n) for reason, n in finished.items()}


def test_prefix_cache_shows_in_metrics_and_usage_counts_the_whole_prompt(http, oa):
    def metric(text: str, name: str) -> float:
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    system = {"role": "system", "content": "You are a librarian who answers in one line. " * 10}
    before = http.get("/metrics").text
    answers = []
    for _ in range(2):
        body = {"messages": [system, *QUESTION], "max_tokens": 4, "temperature": 0, "lora": "alpha"}
        answers.append(run_raw(http, body).json()["result"])
        chat = oa.chat.completions.create(model="beta", messages=[system, *QUESTION], max_tokens=4, temperature=0)
        answers.append(
            {"response": chat.choices[0].message.content, "usage": {"prompt_tokens": chat.usage.prompt_tokens}}
        )
    after = http.get("/metrics").text
    assert answers[0] == answers[2] and answers[1]["response"] == answers[3]["response"]
    assert answers[1]["usage"]["prompt_tokens"] == answers[3]["usage"]["prompt_tokens"] > 100  # the whole prompt
    hits = metric(after, "lora_kit_prefix_cache_hits_total") - metric(before, "lora_kit_prefix_cache_hits_total")
    reused = metric(after, "lora_kit_prefix_cache_tokens_reused_total") - metric(
        before, "lora_kit_prefix_cache_tokens_reused_total"
    )
    assert hits >= 2 and reused >= 2 * 96  # the second alpha and beta requests: the system prompt's blocks
    assert 0 < metric(after, "lora_kit_prefix_cache_bytes") <= metric(after, "lora_kit_prefix_cache_budget_bytes")


def test_cli_serve_stops_cleanly_on_sigterm(tmp_path):
    from lora_kit import paths

    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(paths.models_dir())  # the converted embedded model, shared
    env = {**os.environ, "LORA_KIT_HOME": str(home), "LORA_KIT_API_TOKEN": "tok"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_kit", "serve", "--port", "0", "--max-tokens-cap", "4"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited before serving"
        url = line.split(" on ")[1].split(" ")[0]
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_for(lambda: _healthy(client), timeout=30)
            resp = client.post(
                RUN + MODEL,
                json={"prompt": "hi", "max_tokens": 50, "temperature": 0},
                headers={"Authorization": "Bearer tok"},
            )
            assert resp.json()["result"]["usage"]["completion_tokens"] <= 4  # the cap applies
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def _healthy(client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False
