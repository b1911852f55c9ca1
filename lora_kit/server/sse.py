"""Server-sent events framing: ``data: <json>`` + blank line per event, ``data: [DONE]`` at the end."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
# Proxies (nginx) buffer responses unless told not to; a token stream must not wait.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: Any) -> bytes:
    """One SSE event carrying ``payload`` as compact JSON on a single line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def parse(text: str) -> list[Any]:
    """The payloads of an SSE body, JSON-decoded; ``[DONE]`` is returned as the string "[DONE]".

    Used by tests and the demo; tolerates ``data:`` without a space, as clients do.
    """
    out: list[Any] = []
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].lstrip(" ")
        if not data:
            continue
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
