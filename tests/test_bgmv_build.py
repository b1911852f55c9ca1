"""The CPU kernel's build and its fallbacks: an engine without the kernel still serves, on torch."""

from __future__ import annotations

import logging

import helpers
import pytest
import torch

from lora_kit.engine.backends import ENV, bgmv

needs_compiler = helpers.needs_compiler()


@pytest.fixture
def fresh_state(monkeypatch):
    """bgmv as if nothing had been loaded in this process (the real state comes back after)."""
    monkeypatch.setattr(bgmv, "_state", {})


def test_backend_override_serves_on_torch_without_the_kernel(
    fresh_state, monkeypatch, tiny_mistral_dir, word_tokenizer, caplog
):
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    monkeypatch.setenv(ENV, "torch")
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="lora_kit.engine"):
        engine = Engine(
            EngineConfig(model="tiny"),
            model=model,
            tokenizer=word_tokenizer,
            adapter_resolver=lambda ref: (_ for _ in ()).throw(KeyError(ref)),
        )
    try:
        assert engine.backend.name == "torch" and engine.cpu_kernel is False and engine.packed_layers == 0
        assert "loaded" not in bgmv._state  # never built nor loaded
        assert not [r for r in caplog.records if r.name.startswith("lora_kit.engine")]  # asked for: no notice
        out = engine.generate_sync(GenerationRequest([1, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True)))
        assert out.completion_tokens == 3
    finally:
        engine.stop()


def test_failed_build_is_reported_and_not_fatal(fresh_state, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LORA_KIT_HOME", str(tmp_path))
    broken = tmp_path / "broken-c++"  # a "compiler" that always fails, on any machine (no compiler needed)
    broken.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    with caplog.at_level(logging.WARNING, logger="lora_kit.engine"):
        assert bgmv.load() is False
    assert "failed" in bgmv.error() and "this compiler is broken" in bgmv.error()
    assert "the CPU LoRA kernel is not used" in caplog.text
    assert bgmv.loaded_path() is None
    assert not list(tmp_path.glob("kernels/*/*.so"))  # nothing half-built left where a load would find it


def test_no_compiler_means_no_kernel(fresh_state, monkeypatch, caplog):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "")
    with caplog.at_level(logging.WARNING, logger="lora_kit.engine"):
        assert bgmv.load() is False
    assert "no C++ compiler" in bgmv.error() and "no C++ compiler" in caplog.text


@needs_compiler
def test_kernel_builds_and_loads():
    assert bgmv.load(), bgmv.error()
    assert bgmv.loaded_path().is_file() and bgmv.error() is None
    assert bgmv.op() is torch.ops.lora_kit.bgmv_


def test_library_key_follows_source_compiler_and_torch(monkeypatch):
    one = bgmv.library_path("c++")
    assert one.parent.parent.name == "kernels" and one == bgmv.library_path("c++")
    assert bgmv.library_path("clang++") != one
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert bgmv.library_path("c++") != one


@needs_compiler
def test_the_portable_build_passes_the_kernel_tests(tmp_path):
    """CPUs without AVX2 run the kernels' plain C++ paths: built here for x86-64 (no AVX2, no FMA)
    with ``LORA_KIT_KERNEL_MARCH``, they pass the same tests against float64 references."""
    import os
    import shutil
    import subprocess
    import sys

    from lora_kit import paths

    (tmp_path / "models").symlink_to(paths.models_dir())
    env = {**os.environ, "LORA_KIT_HOME": str(tmp_path), bgmv.MARCH_ENV: "x86-64"}
    modules = [str(helpers.ROOT / "tests" / name) for name in ("test_int8_linear.py", "test_packed_linear.py")]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *modules],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=helpers.ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-500:]
    built = list(tmp_path.glob("kernels/*/lora_kit_bgmv.so"))
    assert len(built) == 1
    if shutil.which("objdump"):  # no 256-bit register anywhere: the AVX2 paths were not compiled
        listing = subprocess.run(["objdump", "-d", str(built[0])], capture_output=True, text=True).stdout
        assert "ymm" not in listing and "vfmadd" not in listing


def test_march_is_checked_and_keys_the_library(monkeypatch):
    native = bgmv.library_path("c++")
    monkeypatch.setenv(bgmv.MARCH_ENV, "x86-64")
    assert bgmv.march() == "x86-64" and bgmv.library_path("c++") != native
    monkeypatch.setenv(bgmv.MARCH_ENV, "native; rm -rf /")
    with pytest.raises(ValueError, match="LORA_KIT_KERNEL_MARCH must be a -march value"):
        bgmv.march()
