"""Shutdown keeps the HTTP contract (issue 12, defect 7): on SIGTERM, a request still running when
the grace period ends is answered, not cut. A plain request gets the 3050/503 envelope; a stream
gets an in-band error event, then ``data: [DONE]``; new requests get the same 503; the process
exits 0.

The fault test runs the real ``lora-kit serve`` in a subprocess (a signal needs a process) on
the embedded model, on 127.0.0.1 only. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

MODEL = "smollm2-135m-instruct"
RUN = "/client/v4/accounts/acc/ai/run/"
SHUTTING_DOWN = 3050
# Long enough that nothing finishes within the 1 s grace period (the embedded model's context
# ends them at worst; that takes minutes on the CPU).
LONG = {"max_tokens": 8000, "ignore_eos": True, "temperature": 0}


def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _stderr_lines(proc: subprocess.Popen) -> queue.Queue:
    """The server's stderr lines, read by a thread (so no read blocks the test); None at EOF."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _serving_url(proc: subprocess.Popen, lines: queue.Queue, log: list[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        assert line is not None, "the server exited before serving:\n" + "".join(log)
        log.append(line)
        if "serving" in line and " on http" in line:
            return line.split(" on ")[1].split(" ")[0]
    raise AssertionError("the server did not start serving:\n" + "".join(log))


def _stream(url: str, path: str, body: dict, started: threading.Event, out: dict) -> None:
    """POST a streaming request; ``started`` is set at its first data event; ``out`` gets the raw
    SSE text, the status and the content type, or the exception that cut it."""
    chunks: list[str] = []
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(120)) as client:
            with client.stream("POST", path, json=body) as resp:
                out["status"] = resp.status_code
                out["content_type"] = resp.headers.get("content-type", "")
                for line in resp.iter_lines():
                    chunks.append(line + "\n")
                    if line.startswith("data:"):
                        started.set()
    except Exception as err:  # noqa: BLE001 - the old server cut streams: recorded, asserted on below
        out["error"] = repr(err)
    finally:
        out["text"] = "".join(chunks)
        started.set()


def _post(url: str, path: str, body: dict, out: dict) -> None:
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(120)) as client:
            resp = client.post(path, json=body)
            out["status"] = resp.status_code
            out["content_type"] = resp.headers.get("content-type", "")
            out["text"] = resp.text
    except Exception as err:  # noqa: BLE001
        out["error"] = repr(err)


def _sse_payloads(text: str) -> list[Any]:
    from lora_kit.server import sse

    return sse.parse(text)


def test_sigterm_past_the_grace_period_answers_every_request(tmp_path):
    from lora_kit import paths

    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(paths.models_dir())  # the converted embedded model, shared
    env = {**os.environ, "LORA_KIT_HOME": str(home)}
    env.pop("LORA_KIT_API_TOKEN", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lora_kit",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--graceful-timeout",
            "1",
            "--max-tokens-cap",
            "100000",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    threads: list[threading.Thread] = []
    try:
        lines = _stderr_lines(proc)
        url = _serving_url(proc, lines, log)
        with httpx.Client(base_url=url, timeout=30) as client:
            _wait_until(lambda: client.get("/healthz").status_code == 200, 60, "/healthz")

            plain: dict = {}
            cf_stream: dict = {}
            oa_stream: dict = {}
            cf_started, oa_started = threading.Event(), threading.Event()
            threads = [
                threading.Thread(target=_post, args=(url, RUN + MODEL, {"prompt": "Count to ten.", **LONG}, plain)),
                threading.Thread(
                    target=_stream,
                    args=(url, RUN + MODEL, {"prompt": "Tell a story.", "stream": True, **LONG}, cf_started, cf_stream),
                ),
                threading.Thread(
                    target=_stream,
                    args=(
                        url,
                        "/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True, **LONG},
                        oa_started,
                        oa_stream,
                    ),
                ),
            ]
            for t in threads:
                t.start()
            # Both streams have sent tokens, and all three requests are in the running batch.
            _wait_until(lambda: cf_started.is_set() and oa_started.is_set(), 120, "both streams to start")
            _wait_until(lambda: client.get("/healthz").json()["running"] == 3, 120, "three running requests")

        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "a client got no end to its request"
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for t in threads:
            t.join(timeout=30)
    logs = "".join(log)

    # The plain request: the 3050/503 envelope, in JSON (not uvicorn's text/plain 500).
    assert "error" not in plain, plain
    assert plain["status"] == 503, plain
    assert plain["content_type"].startswith("application/json"), plain
    body = json.loads(plain["text"])
    assert body["success"] is False and body["result"] is None, body
    assert [e["code"] for e in body["errors"]] == [SHUTTING_DOWN], body

    # The Cloudflare stream: tokens, then an in-band error event of Cloudflare's stream shape, then [DONE].
    assert "error" not in cf_stream, (cf_stream, logs)
    assert cf_stream["status"] == 200 and cf_stream["content_type"].startswith("text/event-stream")
    events = _sse_payloads(cf_stream["text"])
    assert events[-1] == "[DONE]", events[-3:]
    failure = events[-2]
    assert failure["errors"][0]["code"] == SHUTTING_DOWN, failure
    assert any(isinstance(e, dict) and e.get("response") for e in events[:-2]), "tokens streamed before"

    # The OpenAI stream: chunks, then OpenAI's error body in-band, then [DONE].
    assert "error" not in oa_stream, (oa_stream, logs)
    assert oa_stream["status"] == 200 and oa_stream["content_type"].startswith("text/event-stream")
    events = _sse_payloads(oa_stream["text"])
    assert events[-1] == "[DONE]", events[-3:]
    failure = events[-2]["error"]
    assert failure["code"] == "server_shutting_down" and failure["type"] == "server_error", failure
    assert any(isinstance(e, dict) and e.get("choices") for e in events[:-2]), "chunks streamed before"

    assert rc == 0
    rest = []
    while True:  # the rest of the log, bounded by the pump's EOF marker
        try:
            line = lines.get(timeout=10)
        except queue.Empty:
            break
        if line is None:
            break
        rest.append(line)
    assert "server stopped" in "".join(rest)


# -- the pieces, in-process ----------------------------------------------------------------


@pytest.fixture()
def tiny_engine(tiny_mistral_dir, word_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig, mapping_resolver

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    engine = Engine(
        EngineConfig(model="tiny-mistral"), model=model, tokenizer=word_tokenizer, adapter_resolver=mapping_resolver({})
    )
    yield engine
    engine.stop(10)


def _request(tok: Any, max_tokens: int = 1000) -> Any:
    from lora_kit import chat
    from lora_kit.engine import GenerationRequest, SamplingParams

    ids = chat.render_prompt(tok, "What is two plus two ?", raw=True)
    return GenerationRequest(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_engine_stop_for_shutdown_fails_what_is_left(tiny_engine, word_tokenizer):
    from lora_kit.engine.types import ShuttingDown

    listening = tiny_engine.submit(_request(word_tokenizer))
    gone = tiny_engine.submit(_request(word_tokenizer))
    gone.cancelled = True  # its client left: nobody to tell, it is cancelled as before
    tiny_engine.stop(10, shutting_down=True)
    with pytest.raises(ShuttingDown):
        tiny_engine.result(listening)
    assert tiny_engine.result(gone).finish_reason == "cancelled"
    with pytest.raises(ShuttingDown):  # stopped for good: a new request is refused with the same error
        tiny_engine.generate_sync(_request(word_tokenizer, 2))


def test_new_requests_during_shutdown_get_the_503_envelope(tiny_engine, tmp_path):
    from fastapi.testclient import TestClient

    from lora_kit.registry import Registry
    from lora_kit.server.app import begin_shutdown, create_app

    app = create_app(tiny_engine, Registry(tmp_path / "registry"))
    with TestClient(app) as client:
        begin_shutdown(app)
        cf = client.post(RUN + "tiny-mistral", json={"prompt": "hello"})
        assert cf.status_code == 503
        assert cf.json()["errors"] == [{"code": SHUTTING_DOWN, "message": cf.json()["errors"][0]["message"]}]
        assert "shutting down" in cf.json()["errors"][0]["message"]
        oa = client.post("/v1/completions", json={"model": "tiny-mistral", "prompt": "hello"})
        assert oa.status_code == 503 and oa.json()["error"]["code"] == "server_shutting_down"
        assert client.get("/healthz").status_code == 200  # health and metrics still answer
