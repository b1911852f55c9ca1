"""Constrained output with xgrammar: JSON schema / JSON object answers and tool calls.

One ``GrammarMatcher`` per request; each step the matchers of the constrained rows fill
their rows of a token bitmask, which is applied to the mixed batch's logits. Compiled
grammars are cached by their source in a bounded LRU (by count and by xgrammar's reported
bytes), so a repeated schema or tool list compiles once and distinct schemas cannot grow
memory without bound.

Limits, because a schema is untrusted input: its JSON may be at most ``MAX_SCHEMA_BYTES``,
and it must compile within ``COMPILE_TIMEOUT_S``. Compiling runs in daemon threads, at most
``COMPILE_WORKERS`` at a time; the caller waits for the result up to the budget and then gets
a :class:`GrammarError` (a 400 naming ``response_format`` or ``tools``). xgrammar cannot be
interrupted, so a runaway compile keeps its worker busy until it finishes (then its result
is cached); the worker cap keeps such compiles from piling up, and an identical schema in
flight is awaited, not compiled twice. Callers that must not block (the server's event loop)
build constraints in a worker thread.

A tool call is the JSON object ``{"name": <one of the tools>, "arguments": <its parameters>}``.
With ``tool_choice="auto"`` the model may instead answer text: the grammar is the union
of "text that does not start with ``{``" and that object, so a reply starting with ``{``
is a tool call.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_kit.engine.types import EngineError, InvalidRequest

if TYPE_CHECKING:
    import torch
    import xgrammar


TEXT_EBNF = "root ::= [^{] [^]*"  # any text that does not open a JSON object

MAX_SCHEMA_BYTES = 64 * 1024  # the JSON of a response_format schema or of a request's tools
COMPILE_TIMEOUT_S = 10.0  # how long a request waits for its grammar to compile
COMPILE_WORKERS = 2  # grammars compiling at once (a runaway compile holds one until it ends)
CACHE_MAX_ENTRIES = 64  # compiled grammars kept (least recently used dropped first)
CACHE_MAX_BYTES = 256 * 1024 * 1024  # and their total size, as xgrammar reports it


class GrammarError(InvalidRequest):
    """A schema that is too large or too complex to serve; ``field`` is the request field to name."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


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
    """Compiles and caches grammars for one tokenizer; builds per-request constraints.

    ``timeout_s``, ``max_entries``, ``max_bytes`` and ``workers`` default to the module's limits.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: list[int],
        *,
        timeout_s: float = COMPILE_TIMEOUT_S,
        max_entries: int = CACHE_MAX_ENTRIES,
        max_bytes: int = CACHE_MAX_BYTES,
        workers: int = COMPILE_WORKERS,
    ) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # xgrammar's own cache is unbounded: ours (below) is the only one.
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.timeout_s, self.max_entries, self.max_bytes = timeout_s, max_entries, max_bytes
        self._compiled: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # key -> (grammar, bytes), LRU last
        self._bytes = 0
        self._pending: dict[str, Future] = {}
        self._workers = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._compiled)

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def _store(self, key: str, compiled: Any) -> None:
        size = int(getattr(compiled, "memory_size_bytes", 0) or 0)
        with self._lock:
            if key in self._compiled:
                return
            self._compiled[key] = (compiled, size)
            self._bytes += size
            while len(self._compiled) > 1 and (len(self._compiled) > self.max_entries or self._bytes > self.max_bytes):
                _, (_, dropped) = self._compiled.popitem(last=False)
                self._bytes -= dropped

    def _run(self, key: str, build: Any, done: Future, field: str) -> None:
        try:
            compiled = build()
        except Exception as err:  # noqa: BLE001 - xgrammar reports bad schemas with several exception types
            done.set_exception(GrammarError(f"{field}: cannot build an output grammar: {err}", field))
        else:
            self._store(key, compiled)
            done.set_result(compiled)
        finally:
            with self._lock:
                self._pending.pop(key, None)
            self._workers.release()

    def _compile(self, key: str, build: Any, field: str) -> Any:
        too_slow = GrammarError(
            f"{field}: the output grammar did not compile within {self.timeout_s:g} s; use a simpler schema", field
        )
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit[0]
            done = self._pending.get(key)
        if done is None:
            if not self._workers.acquire(timeout=self.timeout_s):
                raise too_slow  # every worker busy with other compiles for the whole budget
            with self._lock:
                hit = self._compiled.get(key)
                done = self._pending.get(key) if hit is None else None
                started = hit is None and done is None
                if started:
                    done = self._pending[key] = Future()
            if not started:
                self._workers.release()
                if hit is not None:
                    return hit[0]
            else:
                assert done is not None
                threading.Thread(
                    target=self._run, args=(key, build, done, field), name="lora-kit-grammar", daemon=True
                ).start()
        assert done is not None
        try:
            return done.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise too_slow from None

    @staticmethod
    def _source(schema: dict, field: str) -> str:
        source = json.dumps(schema)  # no sort_keys: property order is the output order
        if len(source.encode()) > MAX_SCHEMA_BYTES:
            raise GrammarError(
                f"{field}: the schema is {len(source.encode())} bytes of JSON; the limit is {MAX_SCHEMA_BYTES}", field
            )
        return source

    def _json(self, schema: dict, field: str = "response_format") -> Any:
        if not schema:
            return self._compile("json_object", self.compiler.compile_builtin_json_grammar, field)
        source = self._source(schema, field)
        return self._compile(
            "schema:" + source, lambda: self.compiler.compile_json_schema(source, any_whitespace=False), field
        )

    def _tools(self, schema: dict, with_text: bool) -> Any:
        if not with_text:
            return self._json(schema, "tools")
        source = self._source(schema, "tools")
        xgr = self._xgr

        def build() -> Any:
            union = xgr.Grammar.union(
                xgr.Grammar.from_ebnf(TEXT_EBNF), xgr.Grammar.from_json_schema(source, any_whitespace=False)
            )
            return self.compiler.compile_grammar(union)

        return self._compile("tools:" + source, build, "tools")

    def constraint(
        self, response_format: dict | None, tools: list[dict] | None, tool_choice: Any = None
    ) -> Constraint | None:
        """The constraint of a request, or None when its output is free text.

        Blocks up to ``timeout_s`` while the grammar compiles: call it off any event loop.
        Raises GrammarError (an InvalidRequest) for a schema too large or too slow to compile.
        """
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
