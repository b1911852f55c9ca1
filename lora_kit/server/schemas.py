"""Request bodies of the HTTP API (pydantic), with the ranges of Cloudflare's published schema.

Cloudflare's text-generation input (the JSON schema on each model's page of the Workers AI
docs) is ``oneOf`` a *prompt* form and a *messages* form. Ranges follow the
Mistral-7B-Instruct-v0.1 schema, widened to the v0.2-lora one where that is the newer contract
(penalties -2..2). Unknown keys are ignored, as Cloudflare's schema does not forbid extra
properties.

Each generation body maps itself onto the engine: ``to_sampling_params`` (one mapping for both
APIs, :func:`_sampling_params`, where their fields coincide) and ``engine_tools``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, Optional, TypeVar, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lora_kit.engine import SamplingParams
from lora_kit.engine.constraints import MAX_SCHEMA_BYTES
from lora_kit.engine.types import MAX_MIX_ADAPTERS, MAX_MIX_SCALE
from lora_kit.server import errors

MAX_TEXT = 131072  # maxLength of `prompt` and of a message's `content` in the v0.1 schema


def _strict_bool(value: Any) -> Any:
    """Accept JSON booleans and the strings "true"/"false" (Cloudflare's LoRA docs send ``"raw": "true"``)."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        raise ValueError('must be a boolean (true/false, or the string "true"/"false")')
    return value


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LoraWeight(BaseModel):
    """One adapter of a weighted mix: ``{"name": "a", "scale": 0.7}`` (unknown keys refused: a typo
    such as ``weight`` must not silently mean scale 1)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    # strict: a JSON number only ("0.5" and true are refused, not coerced)
    scale: float = Field(default=1.0, ge=-MAX_MIX_SCALE, le=MAX_MIX_SCALE, allow_inf_nan=False, strict=True)

    def describe(self) -> str:
        """The entry in the API's words: ``'a2' (scale 0.5)``."""
        return f"{self.name!r} (scale {self.scale:g})"


def _distinct_names(mix: list[LoraWeight]) -> list[LoraWeight]:
    """A mix names each adapter once: a repeated one would multiply its scale past the bound."""
    seen: set[str] = set()
    for entry in mix:
        if entry.name in seen:
            raise ValueError(f"the mix names {entry.name!r} twice: give each adapter once, with its whole scale")
        seen.add(entry.name)
    return mix


# ``lora``: an adapter reference, or a weighted mix of up to MAX_MIX_ADAPTERS distinct adapters
# whose LoRA deltas are added, each times its scale (llama.cpp's per-request scales; see README).
# A string is a reference, anything else must be a mix: the error then names the mix's problem
# only, not also "Input should be a valid string".
LoraField = Optional[
    Annotated[
        Union[
            Annotated[str, Field(min_length=1), Tag("lora-ref")],
            Annotated[
                list[LoraWeight],
                Field(min_length=1, max_length=MAX_MIX_ADAPTERS),
                AfterValidator(_distinct_names),
                Tag("lora-mix"),
            ],
        ],
        Discriminator(lambda value: "lora-ref" if isinstance(value, str) else "lora-mix"),
    ]
]


def describe_lora(lora: Union[str, list[LoraWeight]]) -> str:
    """A ``lora`` value in the API's words, for messages: ``'a1'`` or ``a mix of 'a1' (scale 1), ...``."""
    if isinstance(lora, str):
        return repr(lora)
    return "a mix of " + ", ".join(entry.describe() for entry in lora)


class ContentPart(_Lenient):
    type: str = "text"
    text: str = Field(max_length=MAX_TEXT)


class ToolCallFunction(_Lenient):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"


class ToolCallIn(_Lenient):
    """A tool call in an assistant message (OpenAI shape or Cloudflare's flat one)."""

    id: Optional[str] = None
    type: Optional[str] = "function"
    function: Optional[ToolCallFunction] = None
    name: Optional[str] = None
    arguments: Union[str, dict[str, Any], None] = None


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: Union[Annotated[str, Field(max_length=MAX_TEXT)], list[ContentPart], None] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None

    def text(self) -> str:
        """The content as one string (content parts are joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_chat(self) -> dict[str, Any]:
        """The plain dict :mod:`lora_kit.chat` renders."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = [_openai_tool_call(c, i) for i, c in enumerate(self.tool_calls)]
        return out


def _openai_tool_call(call: ToolCallIn, index: int) -> dict[str, Any]:
    import json

    if call.function is not None:
        name, args = call.function.name, call.function.arguments
    else:
        name, args = call.name or "", call.arguments if call.arguments is not None else {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"id": call.id or f"call_{index}", "type": "function", "function": {"name": name, "arguments": args}}


class ToolParameters(_Lenient):
    type: str
    properties: dict[str, Any]
    required: list[str] = Field(default_factory=list)


class FunctionDef(_Lenient):
    name: str = Field(min_length=1)
    description: str = ""
    parameters: ToolParameters


class Tool(_Lenient):
    """A tool: OpenAI's ``{type: "function", function: {...}}`` or Cloudflare's flat ``{name, description, parameters}``."""

    type: Optional[Literal["function"]] = None
    function: Optional[FunctionDef] = None
    name: Optional[str] = None
    description: Optional[str] = None
    parameters: Optional[ToolParameters] = None

    @model_validator(mode="after")
    def _one_shape(self) -> Tool:
        if self.function is None and (not self.name or self.parameters is None):
            raise ValueError("a tool needs either 'function' or 'name' and 'parameters'")
        return self

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI shape, which chat templates and the engine take."""
        if self.function is not None:
            fn = self.function
        else:
            assert self.name and self.parameters is not None  # checked by _one_shape
            fn = FunctionDef(name=self.name, description=self.description or "", parameters=self.parameters)
        return {"type": "function", "function": fn.model_dump()}


class ResponseFormat(_Lenient):
    """``{type: "json_object" | "json_schema", json_schema: ...}``; OpenAI's ``text`` means no constraint."""

    type: Literal["json_object", "json_schema", "text"]
    json_schema: Any = None

    def schema(self) -> Any:
        """The JSON schema itself (OpenAI nests it as ``json_schema.schema``), or None."""
        js = self.json_schema
        if isinstance(js, dict) and isinstance(js.get("schema"), dict) and ("name" in js or "strict" in js):
            return js["schema"]
        return js

    def to_engine(self) -> Optional[dict[str, Any]]:
        """``None`` (free text), ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": SCHEMA}``."""
        if self.type == "text":
            return None
        if self.type == "json_schema":
            schema = self.schema()
            if not isinstance(schema, (dict, bool)):
                raise ValueError("response_format.json_schema must be a JSON schema object")
            size = len(json.dumps(schema).encode())
            if size > MAX_SCHEMA_BYTES:  # refused before compiling: grammar work grows with the schema
                raise ValueError(f"the schema is {size} bytes of JSON; the limit is {MAX_SCHEMA_BYTES}")
            return {"type": "json_schema", "json_schema": schema}
        return {"type": "json_object"}


def _sampling_params(
    req: Union[Sampling, OpenAISampling], *, max_tokens: int, max_tokens_cap: int, stop: list[str]
) -> SamplingParams:
    """The engine's settings from the sampling fields both APIs share; InvalidRequest (a ValueError)
    for values the engine cannot honour.

    ``max_tokens`` is clamped to the server's cap (a cap, not a new upper bound of the schema).
    Cloudflare's v0.1 schema lets ``top_p`` reach 2: anything >= 1 keeps the whole distribution.
    ``top_p`` 0 is the limit of keeping only the most likely token, i.e. ``top_k`` 1.
    """
    k = req.top_k or 0
    p = 1.0 if req.top_p is None else min(float(req.top_p), 1.0)
    if p <= 0.0:
        p, k = 1.0, 1
    params = SamplingParams(
        max_tokens=max(1, min(max_tokens, max_tokens_cap)),
        temperature=float(req.temperature),
        top_p=p,
        top_k=k,
        seed=req.seed,
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        frequency_penalty=0.0 if req.frequency_penalty is None else float(req.frequency_penalty),
        presence_penalty=0.0 if req.presence_penalty is None else float(req.presence_penalty),
        stop=stop,
        ignore_eos=req.ignore_eos,
    )
    params.validate()
    return params


def _tools_for_engine(tools: Optional[list[Tool]], tool_choice: Any) -> tuple[Optional[list[dict[str, Any]]], Any]:
    """The engine's ``(tools, tool_choice)``: OpenAI-shaped tools, and no tool choice without tools."""
    if not tools:
        return None, None
    return [t.to_openai() for t in tools], tool_choice


class Sampling(_Lenient):
    """The sampling fields shared by both Cloudflare forms."""

    PROMPT_FIELD: ClassVar[str] = "prompt"  # the field a rendering error names

    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.6, ge=0, le=5)
    top_p: Optional[float] = Field(default=None, ge=0, le=2)
    top_k: Optional[int] = Field(default=None, ge=1, le=50)
    seed: Optional[int] = Field(default=None, ge=1, le=9999999999)
    repetition_penalty: Optional[float] = Field(default=None, gt=0, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    raw: bool = False
    stream: bool = False
    lora: LoraField = None
    response_format: Optional[ResponseFormat] = None
    # Not in Cloudflare's schema (vLLM's extension): keep generating past end-of-sequence
    # until max_tokens, for load tests and benchmarks with fixed output lengths.
    ignore_eos: bool = False

    @field_validator("raw", "stream", "ignore_eos", mode="before")
    @classmethod
    def _bools(cls, value: Any) -> Any:
        return _strict_bool(value)

    def to_sampling_params(self, *, max_tokens_cap: int) -> SamplingParams:
        """The engine's sampling settings (Cloudflare has no stop sequences)."""
        return _sampling_params(self, max_tokens=self.max_tokens, max_tokens_cap=max_tokens_cap, stop=[])

    def engine_tools(self) -> tuple[Optional[list[dict[str, Any]]], Any]:
        """The engine's ``(tools, tool_choice)``; the prompt form has none."""
        return None, None


class PromptRequest(Sampling):
    """Cloudflare's prompt form (``required: ["prompt"]``)."""

    prompt: str = Field(min_length=1, max_length=MAX_TEXT)


class Function(_Lenient):
    name: str
    code: str


class MessagesRequest(Sampling):
    """Cloudflare's messages form (``required: ["messages"]``)."""

    PROMPT_FIELD: ClassVar[str] = "messages"

    messages: list[Message] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    functions: Optional[list[Function]] = None
    # Not in Cloudflare's schema: OpenAI's tool_choice ("auto", "required", "none", {function}).
    tool_choice: Any = None

    def engine_tools(self) -> tuple[Optional[list[dict[str, Any]]], Any]:
        return _tools_for_engine(self.tools, self.tool_choice)


# -- OpenAI-compatible -----------------------------------------------------------------------------

# The values of unimplemented OpenAI fields that ask for nothing (compared by value and type:
# ``False`` is neutral for ``echo`` but 0 is not neutral ``logprobs`` of a completion).
UNSUPPORTED_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class OpenAISampling(_Lenient):
    # As Cloudflare's default; OpenAI's "until the context ends" is rarely wanted.
    DEFAULT_MAX_TOKENS: ClassVar[int] = 256
    PROMPT_FIELD: ClassVar[str] = "prompt"

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=5)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = None
    repetition_penalty: Optional[float] = Field(default=None, gt=0, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    ignore_eos: bool = False  # vLLM's extension (extra_body in the SDK), as in the Cloudflare form

    @field_validator("stream", mode="before")
    @classmethod
    def _bools(cls, value: Any) -> Any:
        return _strict_bool(value)

    stream_options: Optional[dict[str, Any]] = None
    lora: LoraField = None
    response_format: Optional[ResponseFormat] = None
    # OpenAI fields this server does not implement: accepted only at their neutral values, refused
    # otherwise (as n > 1 is), so no client silently gets an answer it did not ask for.
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None

    @field_validator("logprobs", "top_logprobs", "logit_bias", "echo", "best_of", "suffix", check_fields=False)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if any(value == neutral and type(value) is type(neutral) for neutral in UNSUPPORTED_NEUTRAL[info.field_name]):
            return value
        raise ValueError("not supported by this server; leave it out")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def to_sampling_params(self, *, max_tokens_cap: int) -> SamplingParams:
        """The engine's sampling settings; ``max_completion_tokens`` (the newer name) wins over ``max_tokens``."""
        wanted = self.max_completion_tokens or self.max_tokens or self.DEFAULT_MAX_TOKENS
        return _sampling_params(self, max_tokens=wanted, max_tokens_cap=max_tokens_cap, stop=self.stop_list())

    def engine_tools(self) -> tuple[Optional[list[dict[str, Any]]], Any]:
        """The engine's ``(tools, tool_choice)``; a completion has none."""
        return None, None


class ChatCompletionRequest(OpenAISampling):
    PROMPT_FIELD: ClassVar[str] = "messages"

    messages: list[Message] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Any = None

    def engine_tools(self) -> tuple[Optional[list[dict[str, Any]]], Any]:
        return _tools_for_engine(self.tools, self.tool_choice)


class CompletionRequest(OpenAISampling):
    DEFAULT_MAX_TOKENS: ClassVar[int] = 16  # OpenAI's default for /v1/completions

    prompt: Union[str, list[str]]
    echo: Any = None  # unsupported unless neutral (see OpenAISampling._unsupported)
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


GenerationBody = Union[PromptRequest, MessagesRequest, ChatCompletionRequest, CompletionRequest]


class FinetuneCreate(_Lenient):
    """Body of ``POST /accounts/{id}/ai/finetunes`` (wrangler and the SDK send these)."""

    model: str = Field(min_length=1)
    name: str = Field(min_length=1)
    description: Optional[str] = ""
    public: bool = False


def describe_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One readable line per problem, each naming its field: ``temperature: Input should be ...``."""
    parts = []
    for item in err.errors():
        loc = ""
        for piece in item["loc"]:
            if isinstance(piece, int):
                loc += f"[{piece}]"
            elif not piece.startswith(("function-", "lora-")) and piece not in (
                "str",
                "list[ContentPart]",
                "constrained-str",
            ):
                loc += f".{piece}" if loc else piece
        msg = item["msg"].removeprefix("Value error, ")
        parts.append(f"{prefix}{loc or 'body'}: {msg}")
    return "; ".join(parts)


Body = TypeVar("Body", bound=BaseModel)


def parse(model: type[Body], body: dict[str, Any]) -> Body:
    """``body`` validated as ``model``; 5006/400 naming each field in error otherwise."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise errors.bad_input(describe_validation_error(err)) from None


# -- the runtime adapter API (vLLM's bodies; see lora_kit.server.runtime_adapters) --


class LoadLoraAdapter(BaseModel):
    """vLLM's body (``lora_int_id`` and other vLLM keys are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: Optional[str] = Field(default=None, min_length=1, max_length=4096)


class UnloadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=128)
