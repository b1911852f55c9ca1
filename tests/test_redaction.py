"""Issue 29 item 13: the read-only registry routes (``/v1/lora-kit/adapters[/{ref}]``) return a
version's record without server paths, cut structurally: the fields that hold paths lose all but
their last component (a directory with spaces whole, a ``file:`` URL too), the warnings and verify
problems that quote those paths or the stored files name them the same way, and free text (a
description that mentions ``/v1/load_lora_adapter``) comes back exactly as registered.

A real server on 127.0.0.1 over the real engine (embedded SmolLM2-135M-Instruct) and a real registry
whose adapters came from under ``.../John Smith/run dir``.
"""

from __future__ import annotations

import json
import shutil
from urllib.parse import quote

import httpx
import pytest
from helpers import MODEL, make_embedded_adapter

DESCRIPTION = "load it with POST /v1/load_lora_adapter; /v1/models lists it, see ~/notes and C:\\x"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``talk@1`` (a lineage full of paths with spaces), ``edited@1`` (its version directory's config
    replaced by an edited copy) and ``lost@1`` (its config blob deleted), all registered from and
    stored under ``.../John Smith/``; one engine and an open server over them."""
    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.registry import Registry
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    tmp = tmp_path_factory.mktemp("redaction")
    home = tmp / "John Smith"
    run_dir = home / "run dir"
    adapter = make_embedded_adapter(run_dir / "adapter", seed=3)
    other = run_dir / "other adapter"
    shutil.copytree(adapter, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.25}))

    registry = Registry(home / "registry")
    facts = {
        "run_dir": str(run_dir),
        "recipe": {
            "model": {"base": str(home / "models" / "base model")},
            "data": {
                "train": "file://" + quote(str(home / "data" / "train set.jsonl")),
                "eval": [str(home / "data" / "held out.jsonl"), "imdb"],
            },
            "output": {"name": "talk", "run_dir": str(run_dir), "description": DESCRIPTION},
        },
        "note": "trained by John Smith",  # free text: kept
    }
    # A base that is a path not on this machine: recorded as given, and quoted by a warning.
    base = str(home / "models" / "base model")
    talk = registry.register(adapter, "talk", base_model=base, description=DESCRIPTION, tags=["/v1/x"], lineage=facts)
    edited = registry.register(adapter, "edited", base_model=MODEL)
    lost = registry.register(other, "lost", base_model=MODEL)
    vdir = registry.version_dir(edited)
    (vdir / "adapter_config.json").unlink()
    (vdir / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    registry.blob_path(lost.files["adapter_config.json"]["sha256"]).unlink()

    engine = Engine(EngineConfig(MODEL, max_slots=2, max_batch=4, max_queue=8), registry_root=registry.root)
    engine.start()
    app = create_app(engine, registry, ServerConfig(uploads_dir=tmp / "uploads", max_tokens_cap=16))
    try:
        with BackgroundServer(app) as srv:
            yield {"url": srv.url, "tmp": tmp, "talk": talk, "lost": lost}
    finally:
        engine.stop(10)


def fragments(world) -> list[str]:
    """Pieces of the server's directories that must not be in a response."""
    return ["John Smith", "John%20Smith", str(world["tmp"]), world["tmp"].name, "registry/", "blobs/", "versions/"]


def assert_no_server_path(text: str, world) -> None:
    for fragment in fragments(world):
        assert fragment not in text, f"{fragment!r} leaked: {text}"


def test_detail_cuts_every_path_field_and_keeps_the_description(world):
    with httpx.Client(base_url=world["url"], timeout=60) as http:
        detail = http.get("/v1/lora-kit/adapters/talk@1")
    assert detail.status_code == 200
    # Every other word is where it was: the free text about paths is not free text about the server.
    text = detail.text.replace("trained by John Smith", "")
    assert_no_server_path(text, world)
    body = detail.json()
    assert body["description"] == DESCRIPTION and body["tags"] == ["/v1/x"]
    assert body["base_model"] == "base model"
    lineage = body["lineage"]
    assert lineage["note"] == "trained by John Smith"
    assert lineage["source_dir"] == "adapter" and lineage["run_dir"] == "run dir"
    assert lineage["base_model"]["spec"] == "base model"
    assert lineage["recipe"]["model"]["base"] == "base model"
    assert lineage["recipe"]["data"] == {"train": "train set.jsonl", "eval": ["held out.jsonl", "imdb"]}
    assert lineage["recipe"]["output"]["run_dir"] == "run dir"
    assert lineage["recipe"]["output"]["description"] == DESCRIPTION
    assert any("'base model' is not available locally" in w for w in body["warnings"])
    assert body["verify"] == {"ok": True, "problems": []}


def test_listing_keeps_the_description(world):
    with httpx.Client(base_url=world["url"], timeout=60) as http:
        listing = http.get("/v1/lora-kit/adapters")
    assert listing.status_code == 200
    assert_no_server_path(listing.text, world)
    talk = next(entry for entry in listing.json()["data"] if entry["name"] == "talk")
    assert talk["versions"][0]["description"] == DESCRIPTION and talk["versions"][0]["tags"] == ["/v1/x"]


def test_verify_problems_name_stored_files_not_server_paths(world):
    with httpx.Client(base_url=world["url"], timeout=60) as http:
        edited = http.get("/v1/lora-kit/adapters/edited@1")
        lost = http.get("/v1/lora-kit/adapters/lost@1")
    for answer in (edited, lost):
        assert answer.status_code == 200
        assert_no_server_path(answer.text, world)
    assert edited.json()["verify"] == {
        "ok": False,
        "problems": ["edited@1: adapter_config.json differs from the stored file (edited copy)"],
    }
    sha = world["lost"].files["adapter_config.json"]["sha256"]  # its stored name
    assert lost.json()["verify"] == {
        "ok": False,
        "problems": [f"lost@1: adapter_config.json is missing from the store (blob {sha})"],
    }


def test_hide_paths_cuts_file_urls_and_known_directories_with_spaces(tmp_path):
    """Free-form messages still go through ``hide_paths``: a ``file:`` URL is cut like a path, and a
    known directory with spaces goes whole."""
    from lora_kit.errors import hide_paths

    known = tmp_path / "John Smith"
    message = f"cannot read file://{quote(str(known))}/data.jsonl or {known}/adapter_config.json"
    assert hide_paths(message) == "cannot read data.jsonl or Smith/adapter_config.json".replace(
        "Smith/adapter_config.json", hide_paths(f"{known}/adapter_config.json")
    )
    assert hide_paths(message, [known]) == "cannot read data.jsonl or adapter_config.json"
    assert hide_paths("see file:/srv/a/b.jsonl, http://h/a/b") == "see b.jsonl, http://h/a/b"
