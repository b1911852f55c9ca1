"""The engine's public data types and errors (what the server builds and receives)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_kit.errors import LoraKitError


class EngineError(LoraKitError):
    """Base class of the errors a request can fail with."""


class Overloaded(EngineError):
    """The waiting queue is full; the server answers 429."""


class ShuttingDown(EngineError):
    """The engine is stopping for good (the server got SIGTERM): a request still waiting or running,
    or one submitted now, ends with this error; the server answers 503 (a stream: an error event)."""

    def __init__(self, message: str = "the server is shutting down; retry the request on another instance") -> None:
        super().__init__(message)


class UnknownAdapter(EngineError):
    """The adapter reference names no adapter (never a silent fall-back to the base)."""


class AdapterError(EngineError):
    """The adapter exists but cannot be served on this base (shapes, targets, format)."""


class InvalidRequest(EngineError, ValueError):
    """A request that cannot be served as given (bad params, schema or tools); the server answers 400."""


class InvalidAdapterReference(InvalidRequest):
    """The adapter field is not a reference at all (not NAME, NAME@VERSION, NAME:ALIAS or an id): 400."""


class RequestFailed(EngineError):
    """An internal failure of one request (preparing, sampling or post-processing its row, or a
    forward of its batch). Its message is safe to show a client: no exception class, no path,
    only the request id; what went wrong is logged (logger ``lora_kit.engine``) under that id."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"internal error while generating (request id {request_id}); the log has the details")
        self.request_id = request_id


# Temperatures below this sample greedily (documented: SamplingParams): ``logits / temperature``
# overflows float32 for tiny ones (1e-40: inf, then NaN probabilities), and at 1e-5 a logit
# 1e-3 ahead is already e^100 times likelier, so only exact near-ties could differ from greedy.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Per-request decoding settings; ``temperature`` 0 (or below ``GREEDY_TEMPERATURE``) is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past EOS until max_tokens (benchmarks, as vLLM's)

    def validate(self) -> None:
        """Raise ValueError for values out of their ranges."""
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 5.0:
            raise InvalidRequest("temperature must be between 0 and 5")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidRequest("top_k must be >= 0")
        if not 0 < self.repetition_penalty < math.inf:
            raise InvalidRequest("repetition_penalty must be > 0")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequest(f"{name} must be a finite number")


# Weighted mixes (a request's ``adapter`` as a list): llama.cpp's per-request scales, here per row.
MAX_MIX_ADAPTERS = 4
MAX_MIX_SCALE = 2.0


@dataclass(frozen=True)
class AdapterWeight:
    """One entry of a weighted mix: an adapter reference and the factor its LoRA delta is multiplied by."""

    ref: str
    scale: float = 1.0


AdapterSpec = str | Sequence[AdapterWeight] | None
"""What a request runs with: None (the base), a reference, or a weighted mix of references."""


def adapter_mix(spec: Sequence[AdapterWeight]) -> tuple[AdapterWeight, ...]:
    """The entries of a weighted mix, checked: 1 to ``MAX_MIX_ADAPTERS`` entries, each scale a
    number in [-``MAX_MIX_SCALE``, ``MAX_MIX_SCALE``]. Raises InvalidRequest."""
    mix = tuple(spec)
    if not 1 <= len(mix) <= MAX_MIX_ADAPTERS:
        raise InvalidRequest(f"a mix names 1 to {MAX_MIX_ADAPTERS} adapters, not {len(mix)}")
    for entry in mix:
        if not isinstance(entry, AdapterWeight) or not isinstance(entry.ref, str) or not entry.ref:
            raise InvalidRequest("each entry of a mix is an adapter reference with a scale")
        scale = entry.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InvalidRequest(f"the scale of {entry.ref!r} must be a number")
        if abs(scale) > MAX_MIX_SCALE:
            raise InvalidRequest(f"the scale of {entry.ref!r} must be in [-{MAX_MIX_SCALE:g}, {MAX_MIX_SCALE:g}]")
    return mix


def single_ref(spec: AdapterSpec) -> str | None:
    """The reference of ``spec`` when it runs one adapter exactly as trained: a reference, or a
    mix of one entry at scale 1 (the same thing, token for token); None otherwise."""
    if spec is None or isinstance(spec, str):
        return spec
    mix = tuple(spec)
    one = len(mix) == 1 and isinstance(mix[0], AdapterWeight) and mix[0].scale == 1.0
    return mix[0].ref if one else None


class ResolvedAdapter(tuple):
    """A resolved adapter reference: ``(key, path)`` as a 2-tuple (so ``key, path = resolve(ref)``
    works), ``key`` its canonical, immutable reference (``NAME@VERSION``), plus ``files``:
    ``{file name: {"sha256", "size"}}`` as the registry recorded them, which the loader checks the
    directory against; None (a plain 2-tuple, a mapping_resolver): not checked."""

    files: Mapping[str, Mapping[str, Any]] | None

    def __new__(cls, key: str, path: Path, files: Mapping[str, Mapping[str, Any]] | None = None) -> ResolvedAdapter:
        self = super().__new__(cls, (key, Path(path)))
        self.files = files
        return self

    @property
    def key(self) -> str:
        return str(self[0])


@dataclass
class GenerationRequest:
    """One completion request: prompt token ids, sampling, and optionally an adapter and constraints.

    ``response_format``: ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": S}``
    where S is the schema or ``{"schema": schema, ...}`` (OpenAI style).
    ``tools``: OpenAI (``{"type": "function", "function": {...}}``) or Cloudflare (``{"name", "parameters"}``)
    definitions. ``tool_choice``: ``"auto"`` (default: text or a tool call), ``"required"``, ``"none"``
    or ``{"type": "function", "function": {"name": N}}``.
    """

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: AdapterSpec = None  # a reference, or a weighted mix (see adapter_mix)
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None
    # Names the request in the engine's log lines and in the client-safe message of a failure
    # (the server passes its per-request id, the one of ``X-Request-Id`` and the access log);
    # None: the engine makes one up.
    request_id: str | None = None
    # The adapters of ``adapter`` resolved already (reference -> ResolvedAdapter), e.g. by a server
    # that resolved them once off its event loop: the engine loads these without resolving again.
    resolved_adapters: Mapping[str, ResolvedAdapter] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class GenerationOutput:
    """One streamed event: ``text`` is the new text since the previous event."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[dict] | None = None
    replica: str | None = None  # the engine replica that produced it (Ray Serve); None in one process
