"""Builders for the small local models and tokenizers the tests use (no hub needed)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIALS = ["<unk>", "<s>", "</s>"]


def make_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level tokenizer over the words of ``texts``: <unk>=0, <s>=1, </s>=2, no chat template.

    Words are split by the Whitespace pre-tokenizer (``\\w+|[^\\w\\s]+``), so token ids
    can be written down by hand in exact-value tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in [*texts, "[INST] [/INST]"]:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(words - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False
    )


def make_tiny_mistral(path: Path, tokenizer: Any, seed: int = 0, **overrides: Any) -> Path:
    """Save a randomly initialised MistralForCausalLM (GQA, sliding window) and its tokenizer to ``path``."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        sliding_window=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, seed: int = 0, r: int = 4, **lora_kwargs) -> Path:
    """A real PEFT LoRA adapter on the tiny Mistral, with lora_B randomised so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(out)
    return out
