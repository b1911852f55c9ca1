"""Issue 23: a base that fp32 would not fit is held in bf16 (read as bf16, never copied to fp32),
and one that fits in nothing offered is refused before loading, naming the flag that fits it.

The machine's memory is set with ``$LORA_KIT_MEMORY_LIMIT`` relative to the tiny Mistral's size,
so the decisions a 7B base meets on a 24 GiB machine are taken here on a model of kilobytes.
The AVX2 paths are forced (``LORA_KIT_CPU_ISA=avx2``) so ``auto`` decides by size on any CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import greedy, mistral_engine, prompts, run_together

from lora_kit import models
from lora_kit.engine.fit import DoesNotFit, base_fit, check_fits, cpu_weight_dtype


@pytest.fixture
def avx2(monkeypatch):
    """The AVX2 paths, and no fixed part of the reserve: the limits below scale with the tiny model."""
    from lora_kit.engine import fit

    monkeypatch.setenv("LORA_KIT_CPU_ISA", "avx2")
    monkeypatch.setattr(fit, "RESERVE_MIN", 0)


@pytest.fixture
def numel(tiny_mistral_dir):
    n = models.checkpoint_numel(str(tiny_mistral_dir))
    assert n is not None and n > 0
    return n


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tiny_mistral_dir):
    """The tiny Mistral saved as a bf16 checkpoint, as Mistral-7B's is."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-mistral-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.bfloat16).save_pretrained(out)
    assert models.checkpoint_float_dtype(str(out)) == "bfloat16"
    return out


def assert_same_answers(fitted, reference, word_tokenizer) -> None:
    """Both engines give the same greedy tokens and bit-identical logits on every prompt (stopped after)."""
    tokens, logits = [], []
    for eng in (fitted, reference):
        requests = [greedy(p, None, max_tokens=6) for p in prompts(word_tokenizer)]
        for i, request in enumerate(requests):
            request.request_id = f"r{i}"
        with eng.recording_logits() as seen:
            done = run_together(eng, requests)
        eng.stop()
        tokens.append([out.token_ids for out in done])
        logits.append([seen[f"r{i}"] for i in range(len(requests))])
    assert tokens[0] == tokens[1] and all(tokens[0])
    for ours, theirs in zip(*logits):
        assert len(ours) == len(theirs) > 0 and all(torch.equal(x, y) for x, y in zip(ours, theirs))


def save_bf16(tiny_mistral_dir, out, tied: bool):
    """The tiny Mistral as a bf16 checkpoint in ``out``; ``tied``: its head tied to the embedding table."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_mistral_dir, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, config=config, dtype=torch.bfloat16)
    if tied:  # the checkpoint holds a head of its own: tie it to the table
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_a_16_bit_checkpoints_embedding_table_is_never_widened(tmp_path, tiny_mistral_dir, tied):
    """Loaded with 16-bit linears (``linear_dtype``), a bf16 checkpoint's embedding table stays as
    stored behind a lookup that widens the rows it reads: no fp32 copy of the table exists, not even
    for a moment (the load's peak), the lookups equal an fp32 load's exactly, and a tied head stays
    tied to the one table."""
    from transformers import AutoModelForCausalLM

    from lora_kit.widening import WideningEmbedding

    src = save_bf16(tiny_mistral_dir, tmp_path, tied)
    widened = []
    to = torch.Tensor.to
    table_shape = src.get_input_embeddings().weight.shape

    def recording_to(t, *a, **k):  # every 16-bit tensor widened to fp32 after the checkpoint is read
        out = to(t, *a, **k)
        if t.dtype == torch.bfloat16 and out.dtype == torch.float32:
            widened.append(t.shape)
        return out

    widen = models._widen_all_but_linear_weights

    def widen_recorded(model, dtype):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "to", recording_to)
            widen(model, dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "_widen_all_but_linear_weights", widen_recorded)
        model = models.load_model(str(tmp_path), linear_dtype=torch.bfloat16)
    assert widened and table_shape not in widened  # the norms were widened; the table was not
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, WideningEmbedding) and embedding.weight.dtype == torch.bfloat16
    assert (model.get_output_embeddings().weight.data_ptr() == embedding.weight.data_ptr()) == tied
    assert not any(p.dtype == torch.float32 and p.shape == table_shape for p in model.parameters())
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        got, want = embedding(ids), reference.get_input_embeddings()(ids)
        assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("tied", [False, True])
def test_an_engine_on_a_16_bit_checkpoint_equals_one_packed_from_fp32(
    avx2, tmp_path, tiny_mistral_dir, word_tokenizer, tied
):
    """The engine reading a bf16 checkpoint as stored (the table kept 16-bit; tied: one table for the
    lookups and the dense bf16 head of the AVX2 path) gives the tokens and logits of an engine that
    loads it in fp32 and packs it in bf16, exactly."""
    from lora_kit.engine import Engine, EngineConfig

    save_bf16(tiny_mistral_dir, tmp_path, tied)
    fitted = Engine(EngineConfig(model=str(tmp_path), weight_dtype="bfloat16", max_slots=1), tokenizer=word_tokenizer)
    table, head = fitted.model.get_input_embeddings().weight, fitted.model.get_output_embeddings().weight
    assert (table is head) == tied and table.dtype == head.dtype == torch.bfloat16
    reference = mistral_engine(tmp_path, word_tokenizer, {}, weight_dtype="bfloat16", max_slots=1)
    assert_same_answers(fitted, reference, word_tokenizer)


def test_checkpoint_numel_counts_every_tensor_from_the_headers(tiny_mistral_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    stored = {k: v.numel() for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    assert models.checkpoint_numel(str(tiny_mistral_dir)) == sum(stored.values()) - (
        stored["lm_head.weight"] if tied else 0
    )
    assert models.checkpoint_numel("someone/not-here") is None


def test_auto_picks_by_size_on_a_cpu_without_native_bf16(avx2):
    giga = 10**9
    assert cpu_weight_dtype("auto", 7_241_732_096, 22 * 2**30) == "bfloat16"  # a 7B on a 24 GiB machine
    assert cpu_weight_dtype("auto", 134_515_008, 22 * 2**30) == "float32"  # the embedded 135M
    assert cpu_weight_dtype("auto", giga, 8 * giga) == "float32"  # fp32 = half the memory: still fp32
    assert cpu_weight_dtype("auto", giga, 8 * giga - 1) == "bfloat16"
    assert cpu_weight_dtype("auto", None, None) == "float32"  # nothing known: exact
    assert cpu_weight_dtype("float32", 7_241_732_096, 22 * 2**30) == "float32"  # asked for: kept


def test_a_base_that_fits_nowhere_is_refused_naming_the_flags(avx2):
    from lora_kit.engine.fit import BaseFit

    seven_b, machine = 7_241_732_096, 22 * 2**30
    with pytest.raises(DoesNotFit) as err:
        check_fits(BaseFit("float32", seven_b, machine), "mistral-7b")
    message = str(err.value)
    assert "29.0 GB in float32" in message and "--weight-dtype bfloat16 (14.5 GB)" in message
    assert "--quantization nf4 (4.3 GB)" in message and "LORA_KIT_MEMORY_LIMIT" in message
    assert "--weight-dtype int8 (8.2 GB)" in message
    check_fits(BaseFit("bfloat16", seven_b, machine), "mistral-7b")  # fits: no error
    with pytest.raises(DoesNotFit, match=r"fits with --weight-dtype int8 \(8.2 GB\) or --quantization nf4 \(4.3 GB\)"):
        check_fits(BaseFit("bfloat16", seven_b, 14 * 2**30), "mistral-7b")
    with pytest.raises(DoesNotFit, match=r"fits with --quantization nf4 \(4.3 GB\) \(4-bit"):
        check_fits(BaseFit("int8", seven_b, 8 * 2**30), "mistral-7b")
    with pytest.raises(DoesNotFit, match="no precision lora-kit offers fits it here"):
        check_fits(BaseFit("nf4", seven_b, 4 * 2**30), "mistral-7b")


def test_an_engine_holds_a_base_too_large_for_fp32_in_bf16_as_if_packed_from_fp32(
    avx2, monkeypatch, bf16_dir, word_tokenizer, numel
):
    """Under a memory limit where fp32 takes over half, ``auto`` holds bf16 weights, read from the
    bf16 checkpoint as bf16; the tokens and logits equal an engine that loads the checkpoint in
    fp32 and packs it in bf16 (the same values and roundings)."""
    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.engine.backends.packed_linear import PackedLinear

    monkeypatch.setenv(models.MEMORY_ENV, str(4 * numel))
    assert base_fit(str(bf16_dir), "none").weight_dtype == "bfloat16"
    loads, load_model = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(k) or load_model(*a, **k))
    fitted = Engine(EngineConfig(model=str(bf16_dir), max_slots=1), tokenizer=word_tokenizer)
    assert loads == [{"linear_dtype": torch.bfloat16}]  # read as stored: no fp32 copy of the weights
    packed = [m for m in fitted.model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.weight.dtype == torch.bfloat16 and m.io_dtype == torch.float32 for m in packed)
    assert fitted.dtype == torch.float32  # norms, embeddings' lookups, residuals: fp32
    linears = [m for m in fitted.model.modules() if type(m) is torch.nn.Linear]
    assert not any(m.weight.dtype == torch.float32 for m in linears)  # no fp32 copy of a linear weight
    reference = mistral_engine(bf16_dir, word_tokenizer, {}, weight_dtype="bfloat16", max_slots=1)
    assert_same_answers(fitted, reference, word_tokenizer)


def test_a_base_that_does_not_fit_is_refused_before_loading(avx2, monkeypatch, tiny_mistral_dir, word_tokenizer, numel):
    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.evaluation.runner import load_engine, serving_precision

    monkeypatch.setenv(models.MEMORY_ENV, str(2 * numel))
    loads = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a))
    with pytest.raises(DoesNotFit, match=r"fits with .*--quantization nf4"):
        Engine(EngineConfig(model=str(tiny_mistral_dir)), tokenizer=word_tokenizer)
    with pytest.raises(DoesNotFit, match=r"kB in float32, .* fits with .*--quantization nf4"):
        load_engine(str(tiny_mistral_dir), "fp32")
    assert loads == []  # refused before anything was read
    monkeypatch.setenv(models.MEMORY_ENV, str(4 * numel))
    assert serving_precision(str(tiny_mistral_dir)) == "bf16w"  # what eval and the end-of-run eval use
    monkeypatch.setenv(models.MEMORY_ENV, "1G")
    assert serving_precision(str(tiny_mistral_dir)) == "fp32"


def test_the_cli_says_it_in_one_line(tiny_mistral_dir, numel):
    env = {**os.environ, models.MEMORY_ENV: str(2 * numel), "LORA_KIT_CPU_ISA": "avx2"}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_kit", "generate", "--model", str(tiny_mistral_dir), "--max-tokens", "2", "hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("lora-kit: error: the base model") and "of memory available" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_reserve_is_a_tenth_and_at_least_a_gib():
    from lora_kit.engine.fit import RESERVE_MIN, with_reserve

    assert RESERVE_MIN == 2**30
    assert with_reserve(14.5e9) == pytest.approx(15.95e9)  # a 7B in bf16 needs 16 GB free
    assert with_reserve(1e6) == 1e6 + 2**30


def test_auto_is_bf16_wherever_the_cpu_multiplies_bf16_natively(monkeypatch):
    """The AMX/AVX512-BF16 branch, on any machine: bf16 whatever the size (it is the fast path there)."""
    from lora_kit.engine.backends import packed_linear

    monkeypatch.setattr(packed_linear, "native_bf16", lambda: True)
    assert cpu_weight_dtype("auto", 134_515_008, 22 * 2**30) == "bfloat16"
    assert cpu_weight_dtype("float32", 134_515_008, 22 * 2**30) == "float32"
