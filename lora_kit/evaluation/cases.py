"""Evaluation cases: a conversation up to its last assistant reply (the prompt) and that reply (the reference).

The data file is the JSONL chat format training reads (``{"messages": [...]}`` per line;
``{"prompt", "completion"}`` lines are accepted too). Its fingerprint is the sha256 of the
file's bytes, so results on "the same data" are results on the same file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_kit.errors import not_utf8
from lora_kit.evaluation.metrics import EvalError
from lora_kit.registry.lineage import sha256_file


@dataclass(frozen=True)
class EvalCase:
    """``messages``: the conversation before the reference reply (rendered with a generation prompt)."""

    messages: list[dict[str, Any]]
    reference: str


def case_of(messages: Sequence[dict[str, Any]], where: str = "example") -> EvalCase:
    """The case of a conversation: everything before its last assistant message, and that message."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if "assistant" not in roles:
        raise EvalError(f"{where}: no assistant message to use as the reference answer")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    if last == 0:
        raise EvalError(f"{where}: the reference answer has no prompt before it")
    return EvalCase([dict(m) for m in messages[:last]], str(messages[last].get("content") or ""))


def _messages_of(row: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(row, dict):
        raise EvalError(f"{where}: expected a JSON object with 'messages'")
    if "messages" in row:
        messages = row["messages"]
        if isinstance(messages, list):
            return messages
        raise EvalError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if "prompt" in row and "completion" in row:
        return [
            {"role": "user", "content": str(row["prompt"])},
            {"role": "assistant", "content": str(row["completion"])},
        ]
    raise EvalError(f"{where}: expected 'messages' (the training chat format) or 'prompt' and 'completion'")


def load_cases(path: Path | str, max_examples: int | None = None) -> list[EvalCase]:
    """The cases of a JSONL file (the first ``max_examples`` when given)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"no such data file: {path}")
    cases: list[EvalCase] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalError(f"{path}: not UTF-8 text ({not_utf8(err)}); the data is JSONL in UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if max_examples is not None and len(cases) >= max_examples:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}:{n}: not valid JSON ({err.msg}); the data is JSONL, one example a line") from None
        except RecursionError:
            raise EvalError(f"{path}:{n}: not valid JSON (nested too deeply); the data is JSONL") from None
        cases.append(case_of(_messages_of(row, f"{path}:{n}"), f"{path}:{n}"))
    if not cases:
        raise EvalError(f"{path}: no examples")
    return cases


def file_sha256(path: Path | str) -> str:
    """The data fingerprint of an eval result: the hex sha256 of the data file's bytes."""
    return sha256_file(Path(path))
