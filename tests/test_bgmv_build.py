"""The CPU kernel's build and its fallbacks: an engine without the kernel still serves, on torch."""

from __future__ import annotations

import pytest
import torch

from lora_kit.engine import bgmv


@pytest.fixture
def fresh_state(monkeypatch):
    """bgmv as if nothing had been loaded in this process (the real state comes back after)."""
    monkeypatch.setattr(bgmv, "_state", {})


def test_switched_off_by_environment(fresh_state, monkeypatch, tiny_mistral_dir, word_tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, GenerationRequest, SamplingParams

    monkeypatch.setenv(bgmv.ENV_SWITCH, "0")
    assert bgmv.load() is False
    assert bgmv.ENV_SWITCH in bgmv.error()
    assert capsys.readouterr().err == ""  # asked for: no notice
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    engine = Engine(
        "tiny", model=model, tokenizer=word_tokenizer, adapter_resolver=lambda ref: (_ for _ in ()).throw(KeyError(ref))
    )
    try:
        assert engine.cpu_kernel is False and engine._ctx.kernel is None
        out = engine.generate_sync(GenerationRequest([1, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True)))
        assert out.completion_tokens == 3
    finally:
        engine.stop()


def test_failed_build_is_reported_and_not_fatal(fresh_state, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORA_KIT_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    assert bgmv.load() is False
    assert "failed" in bgmv.error()
    assert "the CPU LoRA kernel is not used" in capsys.readouterr().err
    assert bgmv.loaded_path() is None
    assert not list(tmp_path.glob("kernels/*/*.so"))  # nothing half-built left where a load would find it


def test_library_key_follows_source_compiler_and_torch(monkeypatch):
    one = bgmv.library_path("c++")
    assert one.parent.parent.name == "kernels" and one == bgmv.library_path("c++")
    assert bgmv.library_path("clang++") != one
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert bgmv.library_path("c++") != one
