"""Request bodies of the HTTP API (pydantic), with the ranges of Cloudflare's published schema.

Cloudflare's text-generation input is ``oneOf`` a *prompt* form and a *messages* form
(``seeds/000_*.txt``, reference section 2). Ranges follow the Mistral-7B-Instruct-v0.1
schema, widened to the v0.2-lora one where that is the newer contract (penalties -2..2).
Unknown keys are ignored, as Cloudflare's schema does not forbid extra properties.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
            return {"type": "json_schema", "json_schema": schema}
        return {"type": "json_object"}


class Sampling(_Lenient):
    """The sampling fields shared by both Cloudflare forms."""

    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.6, ge=0, le=5)
    top_p: Optional[float] = Field(default=None, ge=0, le=2)
    top_k: Optional[int] = Field(default=None, ge=1, le=50)
    seed: Optional[int] = Field(default=None, ge=1, le=9999999999)
    repetition_penalty: Optional[float] = Field(default=None, ge=0, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    raw: bool = False
    stream: bool = False
    lora: Optional[str] = Field(default=None, min_length=1)
    response_format: Optional[ResponseFormat] = None
    # Not in Cloudflare's schema (vLLM's extension): keep generating past end-of-sequence
    # until max_tokens, for load tests and benchmarks with fixed output lengths.
    ignore_eos: bool = False

    @field_validator("raw", "stream", "ignore_eos", mode="before")
    @classmethod
    def _bools(cls, value: Any) -> Any:
        return _strict_bool(value)


class PromptRequest(Sampling):
    """Cloudflare's prompt form (``required: ["prompt"]``)."""

    prompt: str = Field(min_length=1, max_length=MAX_TEXT)


class Function(_Lenient):
    name: str
    code: str


class MessagesRequest(Sampling):
    """Cloudflare's messages form (``required: ["messages"]``)."""

    messages: list[Message] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    functions: Optional[list[Function]] = None
    # Not in Cloudflare's schema: OpenAI's tool_choice ("auto", "required", "none", {function}).
    tool_choice: Any = None


# -- OpenAI-compatible -----------------------------------------------------------------------------


class OpenAISampling(_Lenient):
    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=5)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = None
    repetition_penalty: Optional[float] = Field(default=None, ge=0, le=2)
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
    lora: Optional[str] = Field(default=None, min_length=1)
    response_format: Optional[ResponseFormat] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(OpenAISampling):
    messages: list[Message] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Any = None


class CompletionRequest(OpenAISampling):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


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
            elif not piece.startswith("function-") and piece not in ("str", "list[ContentPart]", "constrained-str"):
                loc += f".{piece}" if loc else piece
        msg = item["msg"].removeprefix("Value error, ")
        parts.append(f"{prefix}{loc or 'body'}: {msg}")
    return "; ".join(parts)
