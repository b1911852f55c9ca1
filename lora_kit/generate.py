"""One-shot generation for the CLI: render with the shared chat renderer, decode, stop at EOS."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from lora_kit import chat

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def generate(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    messages: Sequence[dict[str, Any]] | None = None,
    prompt: str | None = None,
    raw: bool = False,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
) -> dict[str, Any]:
    """Generate one reply; greedy when ``temperature`` is 0. Returns text and token counts."""
    import torch

    if messages is not None:
        ids = chat.render(tokenizer, messages, add_generation_prompt=True).input_ids
    elif prompt is not None:
        ids = chat.render_prompt(tokenizer, prompt, raw=raw)
    else:
        raise ValueError("give messages or prompt")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    stops = sorted(chat.stop_token_ids(tokenizer, model.generation_config))
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if seed is not None:
            torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
            **sampling,
        )
    new = out[0, len(ids):].tolist()
    finished = bool(new) and new[-1] in stops
    text_ids = new[:-1] if finished else new
    return {
        "text": tokenizer.decode(text_ids, skip_special_tokens=True),
        "prompt_tokens": len(ids),
        "completion_tokens": len(new),
        "finish_reason": "stop" if finished else "length",
    }
