"""Fine-tune uploads are streamed, capped and checked first (issue 12, defect 8): the token and the
fine-tune id are checked before a byte of the body is read, the file part goes to the staging
directory as it arrives under its cap (3006/413 as soon as it is passed, nothing left behind), and
a refused upload's connection is closed instead of drained. A real server on 127.0.0.1, raw httpx.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from helpers import make_adapter

from lora_kit.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from lora_kit.registry import Registry

MODEL = "tiny-mistral"
ACCOUNT = "acc"
FINETUNES = f"/client/v4/accounts/{ACCOUNT}/ai/finetunes"
BOUNDARY = "lora-kit-test-boundary"
CHUNK = 64 * 1024
BIG = 64 * 1024 * 1024  # a body the server must not read: far above any socket buffer
SMALL_CAP = 1024 * 1024  # max_upload_bytes of the capped server


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_mistral_dir, word_tokenizer):
    """One engine; an open server, a capped one (1 MiB uploads) and one behind a token."""
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    root = tmp_path_factory.mktemp("uploads")
    reg = Registry(root / "registry")
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    engine = Engine(
        EngineConfig(model=MODEL, max_slots=2), model=model, tokenizer=word_tokenizer, registry_root=reg.root
    )
    engine.start()
    uploads = root / "staging"
    apps = {
        "open": create_app(engine, reg, ServerConfig(uploads_dir=uploads, max_tokens_cap=8, enable_management=True)),
        "capped": create_app(
            engine,
            reg,
            ServerConfig(uploads_dir=uploads, max_tokens_cap=8, max_upload_bytes=SMALL_CAP, enable_management=True),
        ),
        "token": create_app(engine, reg, ServerConfig(uploads_dir=uploads, max_tokens_cap=8, api_token="s3cret")),
    }
    with (
        BackgroundServer(apps["open"]) as o,
        BackgroundServer(apps["capped"]) as c,
        BackgroundServer(apps["token"]) as t,
    ):
        yield {
            "urls": {"open": o.url, "capped": c.url, "token": t.url},
            "registry": reg,
            "uploads": uploads,
            "adapter": make_adapter(tiny_mistral_dir, root / "adapter", seed=3),
        }
    engine.stop(10)


def create(url: str, name: str, headers: dict[str, str] | None = None) -> str:
    resp = httpx.post(url + FINETUNES, json={"model": MODEL, "name": name}, headers=headers or {}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["result"]["id"]


def field(name: str, value: str) -> bytes:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()


def file_head(filename: str = "blob") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


CLOSE = f"\r\n--{BOUNDARY}--\r\n".encode()
FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


class Counting:
    """A request body from a generator that counts what the client handed to the socket."""

    def __init__(self, head: bytes, filler: int, tail: bytes = CLOSE) -> None:
        self.head, self.filler, self.tail = head, filler, tail
        self.sent = 0

    @property
    def total(self) -> int:
        return len(self.head) + self.filler + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        self.sent += len(self.head)
        yield self.head
        block = b"\0" * CHUNK
        for _ in range(self.filler // CHUNK):  # bounded: filler / 64 KiB chunks
            self.sent += CHUNK
            yield block
        self.sent += len(self.tail)
        yield self.tail


def post(url: str, finetune_id: str, body: Counting, *, declare: bool, headers: dict[str, str] | None = None):
    """POST ``body`` streamed; with ``declare`` its Content-Length is sent, else it is chunked."""
    sent = dict(FORM, **(headers or {}))
    if declare:
        sent["Content-Length"] = str(body.total)
    return httpx.post(f"{url}{FINETUNES}/{finetune_id}/finetune-assets", content=iter(body), headers=sent, timeout=120)


def staged(world, finetune_id: str) -> set[str]:
    return {p.name for p in (world["uploads"] / finetune_id).iterdir()}


def test_unknown_id_and_bad_token_are_refused_before_the_body_is_read(world):
    unknown = str(uuid.uuid4())
    body = Counting(field("file_name", WEIGHTS_FILE) + file_head(), BIG)
    resp = post(world["urls"]["open"], unknown, body, declare=True)
    assert resp.status_code == 404
    assert resp.json() == {
        "result": None,
        "success": False,
        "messages": [],
        "errors": [{"code": 3037, "message": f"Finetune {unknown} not found"}],
    }
    # The old server read (or drained) all 64 MiB; now it answers at once and closes the connection.
    assert body.sent < body.total // 2, (body.sent, body.total)

    # The token is checked first too: a wrong one is a 401 before the body, for an existing id.
    existing = create(world["urls"]["token"], "token-upload", {"Authorization": "Bearer s3cret"})
    body = Counting(field("file_name", WEIGHTS_FILE) + file_head(), BIG)
    resp = post(world["urls"]["token"], existing, body, declare=False, headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 401 and resp.json()["errors"] == [{"code": 10000, "message": "Authentication error"}]
    assert body.sent < body.total // 2, (body.sent, body.total)
    assert staged(world, existing) == {"finetune.json"}


def test_over_the_cap_is_413_early_and_leaves_no_partial_file(world):
    url = world["urls"]["capped"]
    finetune_id = create(url, "too-big")
    # Chunked (no Content-Length to refuse up front): the cap is enforced while the file streams in.
    body = Counting(field("file_name", WEIGHTS_FILE) + file_head(), BIG)
    resp = post(url, finetune_id, body, declare=False)
    assert resp.status_code == 413 and resp.json()["errors"][0]["code"] == 3006
    assert body.sent < body.total // 2, (body.sent, body.total)
    assert staged(world, finetune_id) == {"finetune.json"}  # no partial file, no asset
    # A declared Content-Length over the cap is refused without reading.
    body = Counting(field("file_name", WEIGHTS_FILE) + file_head(), BIG)
    resp = post(url, finetune_id, body, declare=True)
    assert resp.status_code == 413 and resp.json()["errors"][0]["code"] == 3006
    assert body.sent < body.total // 2, (body.sent, body.total)

    # adapter_config.json has its own, smaller cap (1 MiB), on the default (300 MiB) server too,
    # whether its name comes before the file or after it.
    url = world["urls"]["open"]
    finetune_id = create(url, "big-config")
    for head, tail in (
        (field("file_name", CONFIG_FILE) + file_head(), CLOSE),
        (file_head("blob"), b"\r\n" + field("file_name", CONFIG_FILE)[:-2] + CLOSE),
    ):
        body = Counting(head, 2 * 1024 * 1024, tail)
        resp = post(url, finetune_id, body, declare=False)
        assert resp.status_code == 413 and resp.json()["errors"][0]["code"] == 3006, resp.text
        assert staged(world, finetune_id) == {"finetune.json"}


def test_a_normal_upload_streams_to_the_staging_dir_and_registers(world):
    url = world["urls"]["open"]
    finetune_id = create(url, "streamed")
    src: Path = world["adapter"]
    target = f"{url}{FINETUNES}/{finetune_id}/finetune-assets"
    config = httpx.post(
        target, data={"file_name": CONFIG_FILE}, files={"file": ("c.json", (src / CONFIG_FILE).read_bytes())}
    )
    assert config.status_code == 200 and config.json()["result"]["ready"] is False

    weights = (src / WEIGHTS_FILE).read_bytes()
    seen: dict[str, set[str]] = {}

    def body() -> Iterator[bytes]:
        yield field("file_name", WEIGHTS_FILE) + file_head("w.safetensors") + weights[:-100]
        # The server writes the file part to the staging dir while the body is still arriving
        # (the old one held the whole body in memory until its end): wait, bounded, to see it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = staged(world, finetune_id) - {"finetune.json", CONFIG_FILE}
            if now:
                seen["during"] = now
                break
            time.sleep(0.05)
        yield weights[-100:] + CLOSE

    resp = httpx.post(target, content=body(), headers=FORM, timeout=120)
    assert resp.status_code == 200, resp.text
    result = resp.json()["result"]
    assert result["ready"] is True and result["ref"] == "streamed@1"
    assert seen.get("during"), "no file appeared in the staging dir while the body was streaming"
    version = world["registry"].resolve("streamed")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert version.files[name]["sha256"] == hashlib.sha256((src / name).read_bytes()).hexdigest()
    assert staged(world, finetune_id) == {"finetune.json"}  # nothing left behind
    # Complete: more files are refused (400) before the body is read.
    body2 = Counting(field("file_name", WEIGHTS_FILE) + file_head(), BIG)
    again = post(url, finetune_id, body2, declare=True)
    assert again.status_code == 400 and "complete" in again.json()["errors"][0]["message"]
    assert body2.sent < body2.total // 2


def test_the_multipart_stream_parser_at_every_chunk_boundary():
    """Delimiters, headers and CRLFs split across chunks of every small size; preamble, transport
    padding and epilogue ignored; a file part whose bytes look like a delimiter is kept exactly."""
    from lora_kit.server.bodies import MultipartStream
    from lora_kit.server.errors import ApiError

    tricky = b"\r\n--" + BOUNDARY[:-1].encode() + b"\r\n-\r\n\r\n"
    body = (
        b"preamble\r\n"
        + f"--{BOUNDARY} \t\r\n".encode()
        + b'Content-Disposition: form-data; name="file_name"\r\n\r\nadapter_config.json\r\n'
        + f"--{BOUNDARY}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="a \\"b\\".json"\r\n\r\n'
        + tricky
        + f"\r\n--{BOUNDARY}\r\n".encode()
        + b"Content-Type: text/plain\r\n\r\nno name, ignored"
        + f"\r\n--{BOUNDARY}--\r\nepilogue".encode()
    )
    for size in range(1, 24):
        parser = MultipartStream(BOUNDARY)
        parts: list[list] = []
        for at in range(0, len(body), size):
            for event in parser.feed(body[at : at + size]):
                if event[0] == "start":
                    parts.append([event[1], event[2], b""])
                elif event[0] == "data":
                    parts[-1][2] += event[1]
        parser.close()
        assert parts == [
            ["file_name", None, b"adapter_config.json"],
            ["file", 'a "b".json', tricky],
            [None, None, b"no name, ignored"],
        ], size
    truncated = MultipartStream(BOUNDARY)
    truncated.feed(body[: len(body) // 2])
    with pytest.raises(ApiError, match="closing boundary"):
        truncated.close()


def test_missing_or_wrong_fields_keep_their_messages(world):
    url = world["urls"]["open"]
    finetune_id = create(url, "fields")
    target = f"{url}{FINETUNES}/{finetune_id}/finetune-assets"
    no_file = httpx.post(target, data={"file_name": CONFIG_FILE}, files={"other": ("x", b"{}")})
    assert no_file.status_code == 400 and no_file.json()["errors"][0]["code"] == 3039
    assert "the multipart fields 'file_name' and 'file'" in no_file.json()["errors"][0]["message"]
    wrong = httpx.post(target, data={"file_name": "model.bin"}, files={"file": ("x", b"{}")})
    assert wrong.status_code == 400 and "file_name must be one of" in wrong.json()["errors"][0]["message"]
    not_form = httpx.post(target, json={"file_name": CONFIG_FILE})
    assert not_form.status_code == 400 and "multipart/form-data" in not_form.json()["errors"][0]["message"]
    # Without a file_name field, the file part's own filename names the asset.
    by_filename = httpx.post(target, files={"file": (CONFIG_FILE, (world["adapter"] / CONFIG_FILE).read_bytes())})
    assert by_filename.status_code == 200, by_filename.text
    assert staged(world, finetune_id) == {"finetune.json", CONFIG_FILE}
