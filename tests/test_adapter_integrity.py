"""Nothing unverified is served (issue 12, defect 5): an adapter whose stored file no longer has
the sha256 the registry recorded is refused when it is loaded into a slot, for that request only,
through the engine and through HTTP; an intact adapter keeps working, and hashes are cached."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx
import pytest
from helpers import registry_engine

from lora_kit import chat
from lora_kit.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from lora_kit.engine import AdapterError, GenerationRequest, SamplingParams
from lora_kit.engine import adapters as engine_adapters
from lora_kit.registry import Registry

MODEL = "tiny-mistral"


def flip_byte(reg: Registry, ref: str, fname: str = WEIGHTS_FILE) -> Path:
    """Flip one bit in the middle of a stored blob (blobs are read-only: chmod first)."""
    blob = reg.blob_path(reg.resolve(ref).files[fname]["sha256"])
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    return blob


@pytest.fixture
def world(tmp_path, tiny_mistral_dir, word_tokenizer):
    """A registry with ``good`` and ``bad`` (two different adapters) and an engine over it."""
    reg, engine = registry_engine(tmp_path, ("good", "bad"), tiny_mistral_dir, word_tokenizer, max_slots=2)
    yield reg, engine
    engine.stop()


def request(tok, adapter: str | None) -> GenerationRequest:
    prompt = chat.render_prompt(tok, "What is two plus two ?", raw=True)
    return GenerationRequest(prompt_ids=prompt, params=SamplingParams(max_tokens=4), adapter=adapter)


def test_a_corrupted_adapter_is_refused_and_an_intact_one_still_served(world, word_tokenizer, caplog):
    reg, engine = world
    flip_byte(reg, "bad")
    assert reg.verify("bad") and not reg.verify("good")

    with caplog.at_level(logging.ERROR, logger="lora_kit.engine.adapters"):
        with pytest.raises(AdapterError, match=r"adapter 'bad@1' is corrupted: its adapter_model.safetensors") as err:
            engine.check_adapter("bad")
    assert str(reg.root) not in str(err.value)  # the client gets the reference, the log gets the path
    assert any(str(reg.root) in r.getMessage() and "bad@1" in r.getMessage() for r in caplog.records)

    with pytest.raises(AdapterError, match="corrupted"):  # the same through a generation request
        engine.generate_sync(request(word_tokenizer, "bad"))
    assert "bad@1" not in engine.stats()["resident_adapters"]

    good = engine.generate_sync(request(word_tokenizer, "good"))
    base = engine.generate_sync(request(word_tokenizer, None))
    assert good.completion_tokens == 4 and base.completion_tokens == 4
    assert "good@1" in engine.stats()["resident_adapters"]


def test_a_corrupted_config_is_refused(world):
    reg, engine = world
    blob = reg.blob_path(reg.resolve("bad").files[CONFIG_FILE]["sha256"])
    os.chmod(blob, 0o644)
    blob.write_text(blob.read_text().replace('"lora_alpha": 8', '"lora_alpha": 80'))
    with pytest.raises(AdapterError, match=r"adapter 'bad@1' is corrupted: its adapter_config.json"):
        engine.check_adapter("bad")


def test_hashes_are_cached_per_file_stat(world, monkeypatch):
    reg, _ = world
    path = reg.adapter_path("good")
    files = reg.resolve("good").files
    calls = []
    real = engine_adapters.sha256_file

    def counting(file):
        calls.append(file)
        return real(file)

    monkeypatch.setattr(engine_adapters, "sha256_file", counting)
    engine_adapters._HASHES.clear()
    engine_adapters.verify_files("good@1", path, files)
    engine_adapters.verify_files("good@1", path, files)
    assert len(calls) == 2  # two files hashed once each, the second check from the cache
    flip_byte(reg, "good")  # a rewrite changes the file's stat: hashed again, and refused
    with pytest.raises(AdapterError, match="corrupted"):
        engine_adapters.verify_files("good@1", path, files)
    assert len(calls) == 3


def test_a_corrupted_adapter_is_an_error_envelope_over_http(world, tmp_path, word_tokenizer):
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    reg, engine = world
    flip_byte(reg, "bad")
    engine.start()
    app = create_app(engine, reg, ServerConfig(uploads_dir=tmp_path / "uploads", max_tokens_cap=8))
    run = f"/client/v4/accounts/acc/ai/run/{MODEL}"
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        bad = http.post(run, json={"prompt": "hello world", "raw": True, "max_tokens": 4, "lora": "bad"})
        body = bad.json()
        assert 400 <= bad.status_code < 600 and body["success"] is False and body["result"] is None
        message = body["errors"][0]["message"]
        assert "corrupted" in message and "bad" in message and str(reg.root) not in message
        good = http.post(run, json={"prompt": "hello world", "raw": True, "max_tokens": 4, "lora": "good"})
        assert good.status_code == 200 and good.json()["success"] is True
