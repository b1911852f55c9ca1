"""Reading request bodies: a size limit enforced while reading, JSON whatever the content type, multipart.

Cloudflare's own curl examples send JSON without ``Content-Type: application/json`` (curl
then says form-urlencoded), so the body is parsed as JSON regardless of the header.
Multipart is parsed here (RFC 7578, no python-multipart dependency) because the upload
route needs only two parts and exact bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import Request

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
    try:
        value = json.loads(body)
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
    return value


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """Read and parse a JSON object body under ``limit`` bytes."""
    return parse_json_object(await read_body(request, limit))


@dataclass
class Part:
    """One multipart/form-data part."""

    name: str
    filename: Optional[str]
    data: bytes

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


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


def parse_multipart(body: bytes, content_type: str) -> dict[str, Part]:
    """The parts of a ``multipart/form-data`` body by field name; 5006/400 if it is not one."""
    kind, params = _header_params(content_type or "")
    boundary = params.get("boundary")
    if kind != "multipart/form-data" or not boundary:
        raise errors.bad_input("this route takes multipart/form-data with the fields 'file_name' and 'file'")
    delimiter = b"--" + boundary.encode("latin-1")
    pieces = body.split(delimiter)
    parts: dict[str, Part] = {}
    # pieces[0] is the preamble; the last piece starts with "--" (the close delimiter).
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        if piece.startswith(b"\r\n"):
            piece = piece[2:]
        head, sep, data = piece.partition(b"\r\n\r\n")
        if not sep:
            raise errors.bad_input("malformed multipart body: a part has no header/body separator")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", errors="replace").split("\r\n"):
            key, colon, val = line.partition(":")
            if colon:
                headers[key.strip().lower()] = val.strip()
        disposition, dparams = _header_params(headers.get("content-disposition", ""))
        if disposition != "form-data" or "name" not in dparams:
            continue
        parts[dparams["name"]] = Part(dparams["name"], dparams.get("filename"), data)
    return parts
