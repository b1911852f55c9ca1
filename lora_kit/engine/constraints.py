"""Constrained output with xgrammar: JSON schema / JSON object answers and tool calls.

One ``GrammarMatcher`` per request; each step the matchers of the constrained rows fill
their rows of a token bitmask, which is applied to the mixed batch's logits. Compiled
grammars are cached by their source, so a repeated schema or tool list compiles once.

A tool call is the JSON object ``{"name": <one of the tools>, "arguments": <its parameters>}``.
With ``tool_choice="auto"`` the model may instead answer text: the grammar is the union
of "text that does not start with ``{``" and that object, so a reply starting with ``{``
is a tool call.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_kit.engine.types import EngineError, InvalidRequest

if TYPE_CHECKING:
    import torch
    import xgrammar


TEXT_EBNF = "root ::= [^{] [^]*"  # any text that does not open a JSON object


def _schema_of(response_format: dict) -> dict | None:
    """The JSON schema of a response_format, {} for json_object, None for text/absent."""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {}
    if kind != "json_schema":
        raise InvalidRequest(f"response_format.type must be text, json_object or json_schema, not {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest("response_format.json_schema must be an object (a JSON schema)")
    # OpenAI wraps the schema as {"name": ..., "schema": {...}}; Cloudflare passes the schema itself.
    if isinstance(spec.get("schema"), dict) and "type" not in spec:
        return spec["schema"]
    return spec


def tool_spec(tool: dict) -> tuple[str, dict]:
    """(name, parameters schema) of an OpenAI-style or Cloudflare-style tool definition."""
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("every tool needs a name")
    params = fn.get("parameters") or {"type": "object"}
    if not isinstance(params, dict):
        raise InvalidRequest(f"tool {name!r}: parameters must be a JSON schema object")
    return name, params


def tool_call_schema(tools: list[dict], only: str | None = None) -> dict:
    """The JSON schema of one call of one of ``tools`` (or of the tool named ``only``)."""
    choices = []
    for tool in tools:
        name, params = tool_spec(tool)
        if only is not None and name != only:
            continue
        choices.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not choices:
        raise InvalidRequest(f"tool_choice names {only!r}, which is not among the tools")
    return choices[0] if len(choices) == 1 else {"anyOf": choices}


def _tool_mode(tool_choice: Any) -> tuple[str, str | None]:
    """("auto" | "required" | "none", forced tool name) from an OpenAI-style tool_choice."""
    if tool_choice in (None, "auto"):
        return "auto", None
    if tool_choice in ("required", "none"):
        return tool_choice, None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") or {}
        if isinstance(fn.get("name"), str):
            return "required", fn["name"]
    raise InvalidRequest(
        "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


@dataclass
class Constraint:
    """The grammar state of one request."""

    matcher: xgrammar.GrammarMatcher
    tools: bool  # a reply starting with "{" is a tool call

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise EngineError(f"the grammar rejected token {token}")

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def parse_tool_call(text: str, tools: list[dict]) -> dict | None:
    """``{"name", "arguments"}`` when ``text`` is a complete call of one of ``tools``, else None."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    names = {tool_spec(t)[0] for t in tools}
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
        return None
    return {"name": call["name"], "arguments": call["arguments"]}


class GrammarCache:
    """Compiles and caches grammars for one tokenizer; builds per-request constraints."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info)
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _compile(self, key: str, build: Any) -> Any:
        with self._lock:
            hit = self._compiled.get(key)
        if hit is not None:
            return hit
        try:
            compiled = build()
        except Exception as err:  # xgrammar reports bad schemas with several exception types
            raise InvalidRequest(f"cannot build an output grammar: {err}") from err
        with self._lock:
            self._compiled[key] = compiled
        return compiled

    def _json(self, schema: dict) -> Any:
        if not schema:
            return self._compile("json_object", self.compiler.compile_builtin_json_grammar)
        source = json.dumps(schema)  # no sort_keys: property order is the output order
        return self._compile(
            "schema:" + source, lambda: self.compiler.compile_json_schema(source, any_whitespace=False)
        )

    def _tools(self, schema: dict, with_text: bool) -> Any:
        source = json.dumps(schema)  # no sort_keys: property order is the output order
        if not with_text:
            return self._json(schema)
        xgr = self._xgr

        def build() -> Any:
            union = xgr.Grammar.union(
                xgr.Grammar.from_ebnf(TEXT_EBNF), xgr.Grammar.from_json_schema(source, any_whitespace=False)
            )
            return self.compiler.compile_grammar(union)

        return self._compile("tools:" + source, build)

    def constraint(
        self, response_format: dict | None, tools: list[dict] | None, tool_choice: Any = None
    ) -> Constraint | None:
        """The constraint of a request, or None when its output is free text."""
        if tools:
            mode, only = _tool_mode(tool_choice)
            if mode != "none":
                compiled = self._tools(tool_call_schema(tools, only), with_text=mode == "auto")
                return Constraint(self._xgr.GrammarMatcher(compiled), tools=True)
        schema = _schema_of(response_format) if response_format else None
        if schema is None:
            return None
        return Constraint(self._xgr.GrammarMatcher(self._json(schema)), tools=False)

    def bitmask(self, rows: int) -> torch.Tensor:
        return self._xgr.allocate_token_bitmask(rows, self.vocab_size)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int]) -> None:
        self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=indices)
