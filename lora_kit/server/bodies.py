"""Reading request bodies: a size limit enforced while reading, JSON whatever the content type, multipart.

Cloudflare's own curl examples send JSON without ``Content-Type: application/json`` (curl
then says form-urlencoded), so the body is parsed as JSON regardless of the header.
Multipart is parsed here as a stream (RFC 7578, no python-multipart dependency, which is not
installed): the upload route writes the file part to disk as it arrives, under a size cap,
and never holds an adapter file in memory.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional

from fastapi import Request
from starlette.requests import ClientDisconnect

from lora_kit.server import errors
from lora_kit.server.errors import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 3006/413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> ApiError:
    return ApiError(errors.TOO_LARGE, f"Request too large: the body exceeds this server's limit of {limit} bytes")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; 5006/400 naming the problem otherwise."""
    if not body.strip():
        raise errors.bad_input("the request body is empty: send a JSON object")
    huge: list[_HugeInt] = []
    try:
        value = json.loads(body, parse_int=lambda digits: _parse_int(digits, huge))
    except UnicodeDecodeError:
        raise errors.bad_input("the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise errors.bad_input(
            f"malformed JSON in the request body: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except RecursionError:  # e.g. "[" x 100000: the parser gives up, the server must not
        raise errors.bad_input(
            "the request body is nested too deeply: send a JSON object with at most a few hundred levels"
        ) from None
    if not isinstance(value, dict):
        raise errors.bad_input(f"the request body must be a JSON object, not {type(value).__name__}")
    if huge:
        where, digits = _find_huge(value)
        raise errors.bad_input(
            f"{where}: an integer of {digits} digits; this server reads integers of at most {MAX_INT_DIGITS} digits",
            where,
        )
    return value


# Python refuses to convert longer digit strings (sys.get_int_max_str_digits, 4300 by default);
# no field of any body needs more than a few dozen.
MAX_INT_DIGITS = 4300


class _HugeInt:
    """Stands for an integer literal too long to convert, so its field can be named after parsing."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(text: str, huge: list[_HugeInt]) -> Any:
    if len(text.lstrip("-")) <= MAX_INT_DIGITS:
        return int(text)
    huge.append(_HugeInt(len(text.lstrip("-"))))
    return huge[-1]


def _find_huge(value: Any) -> tuple[str, int]:
    """The field path (``lora[0].scale``) and digit count of the first :class:`_HugeInt` in ``value``;
    iterative, as the parsed body may be nested as deep as the parser allows."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, _HugeInt):
            return where or "body", node.digits
        if isinstance(node, dict):
            stack.extend((f"{where}.{key}" if where else str(key), child) for key, child in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((f"{where}[{i}]", child) for i, child in reversed(list(enumerate(node))))
    return "body", MAX_INT_DIGITS + 1


async def read_json(request: Request, limit: int, *, json_type_only: bool = False) -> dict[str, Any]:
    """Read and parse a JSON object body under ``limit`` bytes.

    ``json_type_only`` (the management routes): 5006/415 unless ``Content-Type`` is
    ``application/json`` (or ``+json``). A browser sends such a body cross-site only after a CORS
    preflight, which this server never grants; ``text/plain`` and form bodies it sends freely."""
    if json_type_only:
        kind, _ = _header_params(request.headers.get("content-type", ""))
        if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
            raise errors.unsupported_media_type(
                "this route takes a JSON body sent with 'Content-Type: application/json'"
            )
    return parse_json_object(await read_body(request, limit))


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    main, *rest = value.split(";")
    params: dict[str, str] = {}
    for item in rest:
        key, sep, val = item.strip().partition("=")
        if sep:
            val = val.strip()
            if len(val) >= 2 and val[0] == val[-1] == '"':
                val = val[1:-1].replace('\\"', '"')
            params[key.strip().lower()] = val
    return main.strip().lower(), params


MULTIPART_HELP = "this route takes multipart/form-data with the fields 'file_name' and 'file'"
HEADER_LIMIT = 16 * 1024  # the headers of one part
TEXT_LIMIT = 64 * 1024  # a non-file field (e.g. file_name), kept in memory


def malformed(why: str) -> ApiError:
    return errors.bad_input(f"malformed multipart body: {why}")


class MultipartStream:
    """A push parser for ``multipart/form-data`` (RFC 7578 / RFC 2046 framing).

    :meth:`feed` takes the body chunk by chunk and returns events: ``("start", name, filename)``,
    ``("data", bytes)``, ``("end",)``. Memory is bounded by one chunk plus the delimiter (and
    :data:`HEADER_LIMIT` for a part's headers), whatever the size of a part.
    """

    def __init__(self, boundary: str) -> None:
        self.delimiter = b"\r\n--" + boundary.encode("latin-1")
        self.buf = b"\r\n"  # so that a delimiter at the very start of the body matches too
        self.state = "preamble"

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        self.buf += data
        events: list[tuple[Any, ...]] = []
        delim = self.delimiter
        while True:
            if self.state == "preamble":
                at = self.buf.find(delim)
                if at < 0:
                    self.buf = self.buf[-(len(delim) - 1) :]
                    break
                self.buf = self.buf[at + len(delim) :]
                self.state = "after-delimiter"
            elif self.state == "after-delimiter":
                if len(self.buf) < 2:
                    break
                if self.buf.startswith(b"--"):
                    self.state, self.buf = "done", b""
                    break
                end = self.buf.find(b"\r\n")
                if end < 0:
                    if len(self.buf) > 1024:
                        raise malformed("a boundary line does not end")
                    break
                if self.buf[:end].strip(b" \t"):
                    raise malformed("text after a boundary on its line")
                self.buf = self.buf[end + 2 :]
                self.state = "headers"
            elif self.state == "headers":
                if self.buf.startswith(b"\r\n"):
                    head, self.buf = b"", self.buf[2:]
                else:
                    end = self.buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(self.buf) > HEADER_LIMIT:
                            raise malformed(f"the headers of a part exceed {HEADER_LIMIT} bytes")
                        break
                    head, self.buf = self.buf[:end], self.buf[end + 4 :]
                headers: dict[str, str] = {}
                for line in head.decode("utf-8", errors="replace").split("\r\n"):
                    key, colon, val = line.partition(":")
                    if colon:
                        headers[key.strip().lower()] = val.strip()
                disposition, params = _header_params(headers.get("content-disposition", ""))
                name = params.get("name") if disposition == "form-data" else None
                events.append(("start", name, params.get("filename")))
                self.state = "body"
            elif self.state == "body":
                at = self.buf.find(delim)
                if at >= 0:
                    if at:
                        events.append(("data", self.buf[:at]))
                    events.append(("end",))
                    self.buf = self.buf[at + len(delim) :]
                    self.state = "after-delimiter"
                    continue
                keep = len(delim) - 1
                if len(self.buf) > keep:
                    events.append(("data", self.buf[:-keep]))
                    self.buf = self.buf[-keep:]
                break
            else:  # done: the epilogue is ignored
                self.buf = b""
                break
        return events

    def close(self) -> None:
        """The body has ended: 5006/400 if it ended inside a part. No boundary at all means no parts."""
        if self.state not in ("preamble", "done"):
            raise malformed("the body ends before the closing boundary")


@dataclass
class UploadForm:
    """A streamed multipart form: the small text fields in memory, the file part on disk."""

    fields: dict[str, str] = field(default_factory=dict)
    path: Optional[Path] = None  # the file part, spooled; the caller moves or deletes it
    filename: Optional[str] = None  # the file part's own filename=
    size: int = 0

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def file_too_large(limit: int, what: str) -> ApiError:
    return ApiError(errors.TOO_LARGE, f"Request too large: {what} exceeds this server's limit of {limit} bytes")


async def receive_upload(
    request: Request,
    spool_dir: Path,
    *,
    file_limit: Callable[[dict[str, str], Optional[str]], int],
    body_limit: int,
    file_field: str = "file",
) -> UploadForm:
    """Stream a ``multipart/form-data`` body: the ``file_field`` part to a new file in ``spool_dir``.

    ``file_limit(fields so far, filename)`` caps the file part when it starts; past it, or past
    ``body_limit`` for the whole body (also checked against Content-Length before reading), the
    read stops with 3006/413 and the partial file is deleted. Other fields are kept in memory up
    to :data:`TEXT_LIMIT` bytes each. A later part with the same name replaces an earlier one.
    """
    kind, params = _header_params(request.headers.get("content-type", ""))
    boundary = params.get("boundary")
    if kind != "multipart/form-data" or not boundary:
        raise errors.bad_input(MULTIPART_HELP)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise too_large(body_limit)
    parser = MultipartStream(boundary)
    form = UploadForm()
    sink: Optional[BinaryIO] = None
    text: Optional[bytearray] = None
    name: Optional[str] = None
    limit = 0
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > body_limit:
                raise too_large(body_limit)
            for event in parser.feed(chunk):
                if event[0] == "start":
                    name = event[1]
                    if name == file_field:
                        form.discard()
                        limit = file_limit(form.fields, event[2])
                        form.path = spool_dir / f".upload-{uuid.uuid4().hex}.part"
                        form.filename, form.size = event[2], 0
                        sink = open(form.path, "xb")  # noqa: SIM115 - closed at the part's end or below
                    elif name is not None:
                        text = bytearray()
                elif event[0] == "data":
                    if sink is not None:
                        form.size += len(event[1])
                        if form.size > limit:
                            raise file_too_large(limit, f"the field {file_field!r}")
                        sink.write(event[1])
                    elif text is not None:
                        text += event[1]
                        if len(text) > TEXT_LIMIT:
                            raise file_too_large(TEXT_LIMIT, f"the field {name!r}")
                else:  # end of a part
                    if sink is not None:
                        sink.close()
                        sink = None
                    elif text is not None and name is not None:
                        form.fields[name] = text.decode("utf-8", errors="replace")
                    text, name = None, None
        parser.close()
    except BaseException:
        if sink is not None:
            sink.close()
        form.discard()
        raise
    return form


# How much of a refused upload's remaining body is read (and dropped) before the refusal is sent.
DRAIN_BYTES = 1 << 20


async def drain_body(request: Request, limit: int = DRAIN_BYTES, timeout_s: float = 2.0) -> None:
    """Read and drop what the client is still sending, up to ``limit`` bytes and ``timeout_s``, before
    a refusal is answered on a closing connection.

    Closing a socket that still holds unread data makes the kernel send a reset, which can destroy
    the response before the client reads it: a refused small upload would lose its error. A body
    larger than ``limit`` is cut off anyway (its client may see a reset): the server's memory and
    time come first.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return

    async def drop() -> None:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                return

    try:
        await asyncio.wait_for(drop(), timeout_s)
    except (asyncio.TimeoutError, RuntimeError, ClientDisconnect):
        pass  # too slow, already read ("Stream consumed"), or the client left: answer now
