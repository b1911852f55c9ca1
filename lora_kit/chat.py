"""The one chat renderer: messages -> token ids (+ which tokens are assistant replies).

Training and serving both call :func:`render`, so a conversation tokenizes the same
way in both. Pieces of the conversation are tokenized one by one and concatenated
(as ``mistral_common`` does), which makes the assistant-token mask exact and makes
the serving prompt a token-level prefix of the training sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_kit.errors import LoraKitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")


class ChatError(LoraKitError, ValueError):
    """A conversation that cannot be rendered; the message names the message and why."""


@dataclass
class Rendered:
    """Token ids of a conversation; ``assistant_mask[i]`` is True for tokens of assistant replies (and their EOS)."""

    input_ids: list[int] = field(default_factory=list)
    assistant_mask: list[bool] = field(default_factory=list)

    def add(self, ids: Iterable[int], assistant: bool) -> None:
        ids = list(ids)
        self.input_ids.extend(ids)
        self.assistant_mask.extend([assistant] * len(ids))


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Check roles and contents; returns plain dicts ``{"role", "content", ...}``."""
    if not messages:
        raise ChatError("messages must not be empty")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            msg = dict(msg) if hasattr(msg, "keys") else None
        if msg is None:
            raise ChatError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}")
        content = msg.get("content")
        if content is None and role == "assistant" and msg.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string")
        out.append({**msg, "role": role, "content": content})
    return out


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


def _single_bos(tokenizer: PreTrainedTokenizerBase, rendered: Rendered) -> Rendered:
    bos = tokenizer.bos_token_id
    if bos is not None:
        while len(rendered.input_ids) > 1 and rendered.input_ids[0] == bos and rendered.input_ids[1] == bos:
            del rendered.input_ids[0]
            del rendered.assistant_mask[0]
    return rendered


# -- the built-in Mistral-7B-Instruct-v0.1 format ----------------------------------------


def _mistral_turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Fold the conversation into alternating ("user", text) / ("assistant", text) turns.

    v0.1 has no system role: leading system messages go before the first user message
    as ``system + "\\n\\n" + user`` (mistral_common's InstructTokenizerV1). v0.1 has no
    tool role either: a tool result becomes a user turn that says so.
    """
    system_parts: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        role, content = msg["role"], msg["content"]
        if role == "system":
            if turns:
                raise ChatError(
                    f"messages[{i}]: the Mistral v0.1 format only takes system messages at the start of the conversation"
                )
            system_parts.append(content)
            continue
        if role == "tool":
            name = msg.get("name") or msg.get("tool_call_id") or "tool"
            role, content = "user", f"Result of {name}: {content}"
        if role == "assistant":
            if not turns or turns[-1][0] != "user":
                raise ChatError(
                    f"messages[{i}]: an assistant message must follow a user message in the Mistral v0.1 format"
                )
            turns.append(("assistant", content))
        else:
            if turns and turns[-1][0] == "user":
                # Two user-side messages in a row (e.g. several tool results) share one [INST].
                turns[-1] = ("user", turns[-1][1] + "\n\n" + content)
            else:
                turns.append(("user", content))
    if not turns:
        raise ChatError("the conversation has no user message")
    if system_parts:
        first = turns[0]
        turns[0] = (first[0], "\n\n".join(system_parts) + "\n\n" + first[1])
    return turns


def _render_mistral(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], add_generation_prompt: bool
) -> Rendered:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ChatError("the Mistral v0.1 format needs a tokenizer with BOS and EOS tokens")
    turns = _mistral_turns(messages)
    if add_generation_prompt and turns[-1][0] != "user":
        raise ChatError("a generation prompt needs the conversation to end with a user (or tool) message")
    out = Rendered()
    out.add([bos], assistant=False)
    for role, content in turns:
        if role == "user":
            out.add(_encode(tokenizer, f"[INST] {content} [/INST]"), assistant=False)
        else:
            out.add(_encode(tokenizer, content) + [eos], assistant=True)
    return out


# -- the tokenizer's own chat template ---------------------------------------------------


def _template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: Any
) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
        )
    except TemplateError as err:
        raise ChatError(f"the model's chat template refused this conversation: {err}") from err


def _render_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: Any
) -> Rendered:
    eos = tokenizer.eos_token_id
    out = Rendered()
    done = ""  # the text already emitted
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        if i == 0:
            raise ChatError("messages[0]: a conversation cannot start with an assistant message")
        prompt = _template(tokenizer, messages[:i], True, tools)
        upto = _template(tokenizer, messages[: i + 1], False, tools)
        if not prompt.startswith(done) or not upto.startswith(prompt):
            raise ChatError(
                "the model's chat template renders earlier turns differently as the conversation grows; "
                "it cannot be used for exact prompt/label masking"
            )
        out.add(_encode(tokenizer, prompt[len(done) :]), assistant=False)
        reply = _encode(tokenizer, upto[len(prompt) :])
        if eos is not None and eos in reply:
            cut = reply.index(eos) + 1
            out.add(reply[:cut], assistant=True)
            out.add(reply[cut:], assistant=False)  # template glue after EOS (e.g. a newline) is context
        else:
            out.add(reply + ([eos] if eos is not None else []), assistant=True)
        done = upto
    final = _template(tokenizer, messages, add_generation_prompt, tools)
    if not final.startswith(done):
        raise ChatError("the model's chat template renders earlier turns differently as the conversation grows")
    out.add(_encode(tokenizer, final[len(done) :]), assistant=False)
    if _adds_bos(tokenizer) and (not out.input_ids or out.input_ids[0] != tokenizer.bos_token_id):
        out.input_ids.insert(0, tokenizer.bos_token_id)
        out.assistant_mask.insert(0, False)
    return out


# -- public API ------------------------------------------------------------------------------


def uses_builtin_format(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer has no chat template and the Mistral v0.1 format applies."""
    return not getattr(tokenizer, "chat_template", None)


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Any],
    add_generation_prompt: bool = False,
    tools: Any = None,
) -> Rendered:
    """Render a conversation to token ids and an assistant-token mask.

    With ``add_generation_prompt`` the ids end where the model's reply starts (serving);
    without it, every assistant reply is followed by EOS and marked (training).
    """
    msgs = normalize_messages(messages)
    if uses_builtin_format(tokenizer):
        rendered = _render_mistral(tokenizer, msgs, add_generation_prompt)
    else:
        rendered = _render_template(tokenizer, msgs, add_generation_prompt, tools)
    return _single_bos(tokenizer, rendered)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, raw: bool = False) -> list[int]:
    """Cloudflare's ``prompt`` form: one user turn, or with ``raw`` the text as it is."""
    if not raw:
        return render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True).input_ids
    ids = list(tokenizer.encode(prompt, add_special_tokens=True))
    return _single_bos(tokenizer, Rendered(ids, [False] * len(ids))).input_ids


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS and the model's generation EOS ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return ids
