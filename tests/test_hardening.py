"""Issue 12, defects 3, 4 (the registry/adapter half) and 9: malformed input is a clear 400 or
``lora-kit: error:`` line, never a 500 or a traceback; HTTP errors name no server path and no
other adapter; names, archives, staging dirs and the API token are handled safely."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
import torch
from helpers import make_adapter

from lora_kit.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from lora_kit.registry import AdapterNotFound, InvalidAdapter, InvalidName, Registry
from lora_kit.registry import export as export_mod
from lora_kit.registry.export import MANIFEST, export_archive, import_archive
from lora_kit.registry.store import InvalidReference

MODEL = "tiny-mistral"
RUN = f"/client/v4/accounts/acc/ai/run/{MODEL}"
MALFORMED = [
    "sentiment@99999999999999999999999",  # OverflowError in SQLite before
    "sentiment@\u00b2",  # "²": str.isdigit() accepts it, int() does not (ValueError before)
    "sentiment@",
    "sentiment@-1",
    "sentiment:",
    ":x",
    "../x",
    "Sentiment",
    "sentiment\n",
    "a" * 65,
    "",
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_mistral_dir):
    root = tmp_path_factory.mktemp("hardening-adapters")
    return make_adapter(tiny_mistral_dir, root / "a1", seed=1), make_adapter(tiny_mistral_dir, root / "a2", seed=2)


@pytest.fixture
def reg(tmp_path, adapters):
    registry = Registry(tmp_path / "registry")
    registry.register(adapters[0], "sentiment")
    return registry


# -- defect 3: malformed references ------------------------------------------------------------


@pytest.mark.parametrize("ref", MALFORMED)
def test_a_malformed_reference_is_invalid_reference(reg, ref):
    with pytest.raises(InvalidReference, match="invalid adapter reference .*NAME, NAME@VERSION, NAME:ALIAS"):
        reg.resolve(ref)
    with pytest.raises(InvalidReference):
        reg.remove(ref)
    with pytest.raises(InvalidReference):
        reg.tag(ref, "prod")
    assert reg.resolve("sentiment@1").ref == "sentiment@1"  # well-formed ones still work


@pytest.mark.parametrize("args", [["show", "x@99999999999999999999999"], ["rm", "x@\u00b2"], ["tag", "x@", "prod"]])
def test_cli_prints_one_error_line_for_a_malformed_reference(tmp_path, monkeypatch, capsys, args):
    from lora_kit.cli import main

    monkeypatch.setenv("LORA_KIT_HOME", str(tmp_path / "home"))
    assert main(["adapters", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-kit: error: invalid adapter reference") and "Traceback" not in err


def test_deeply_nested_json_is_a_bad_input_naming_the_body():
    from lora_kit.server.bodies import parse_json_object
    from lora_kit.server.errors import ApiError

    for body in (b"[" * 100_000, b'{"a":' * 100_000):
        with pytest.raises(ApiError) as err:
            parse_json_object(body)
        assert (err.value.code, err.value.status) == (5006, 400)
        assert "request body" in err.value.message and "nested too deeply" in err.value.message


# -- defect 4: messages for HTTP clients -------------------------------------------------------


def test_the_engine_resolver_reveals_no_path_and_no_other_adapter(reg):
    from lora_kit.engine import UnknownAdapter
    from lora_kit.engine.adapters import registry_resolver
    from lora_kit.engine.types import InvalidAdapterReference

    resolve = registry_resolver(reg.root)
    with pytest.raises(AdapterNotFound, match="did you mean sentiment"):  # the CLI keeps its hint
        reg.resolve("sentimen")
    with pytest.raises(UnknownAdapter) as err:
        resolve("sentimen")
    assert "sentimen" in str(err.value)
    assert str(reg.root) not in str(err.value) and "sentiment" not in str(err.value).replace("sentimen'", "")
    with pytest.raises(InvalidAdapterReference, match="invalid adapter reference"):
        resolve("sentiment@99999999999999999999999")


def test_load_errors_name_the_reference_not_the_directory(reg):
    from lora_kit.engine import AdapterError
    from lora_kit.engine.adapters import load_adapter

    path = reg.adapter_path("sentiment")
    with pytest.raises(AdapterError, match=r"^adapter 'sentiment@1': the adapter targets") as err:
        load_adapter("sentiment@1", path, {}, torch.float32, torch.device("cpu"), max_rank=2)
    assert str(reg.root) not in str(err.value)


@pytest.fixture
def server(tmp_path, reg, adapters, tiny_mistral_dir, word_tokenizer):
    """A live server over the tiny Mistral; the engine's max rank (2) is below the adapters' (4),
    so loading ``sentiment`` fails; ``secret-plan`` is another adapter a client must not learn of."""
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    reg.register(adapters[1], "secret-plan")
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    config = EngineConfig(model=MODEL, max_slots=2, max_rank=2)
    engine = Engine(config, model=model, tokenizer=word_tokenizer, registry_root=reg.root)
    engine.start()
    app = create_app(engine, reg, ServerConfig(uploads_dir=tmp_path / "uploads", max_tokens_cap=8))
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
            yield http, reg
    finally:
        engine.stop(10)


def _secrets(reg: Registry) -> list[str]:
    return [str(reg.root), str(reg.root.parent), "secret-plan", "/versions/"]


def test_http_errors_reveal_no_path_and_no_other_adapter(server):
    http, reg = server
    prompt = {"prompt": "hello world", "raw": True, "max_tokens": 2}
    cases = [
        (RUN, {**prompt, "lora": "secret-pla"}, 404),  # unknown: no "did you mean secret-plan"
        (RUN, {**prompt, "lora": "../x"}, 400),
        (RUN, {**prompt, "lora": "sentiment"}, 400),  # cannot be loaded: no versions/<uuid> path
        ("/v1/chat/completions", {"model": "secret-pla", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "lora": "sentiment", "max_tokens": 2}, 400),
    ]
    for route, body, status in cases:
        resp = http.post(route, json=body)
        assert resp.status_code == status, (route, body, resp.text)
        for secret in _secrets(reg):
            assert secret not in resp.text, (route, body, resp.text)


def test_malformed_references_are_400_naming_the_field(server):
    http, _ = server
    for ref in ("sentiment@99999999999999999999999", "sentiment@\u00b2", "../x"):
        resp = http.post(RUN, json={"prompt": "hi", "lora": ref})
        body = resp.json()
        assert resp.status_code == 400 and body["success"] is False, resp.text
        assert body["errors"][0]["code"] == 5006
        assert body["errors"][0]["message"].startswith("lora: invalid adapter reference")
        chat = {"model": ref, "messages": [{"role": "user", "content": "hi"}]}
        resp = http.post("/v1/chat/completions", json=chat)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "model" and error["message"].startswith("model: invalid adapter reference")
        resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "lora": ref})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "lora", resp.text
    resp = http.post(RUN, content=b"[" * 100_000)
    assert resp.status_code == 400 and resp.json()["errors"][0]["code"] == 5006
    assert "nested too deeply" in resp.json()["errors"][0]["message"]
    assert http.get("/healthz").status_code == 200


# -- defect 9: names, archives, staging, the API token -----------------------------------------


def test_a_name_with_a_trailing_newline_is_refused(tmp_path, adapters):
    from lora_kit.registry import check_name

    with pytest.raises(InvalidName):
        check_name("demo\n")
    with pytest.raises(InvalidName):
        Registry(tmp_path / "r").register(adapters[0], "demo\n")


def _archive(path: Path, manifest: object | bytes, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        for name, data in [(MANIFEST, raw), *files.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _good_manifest(reg: Registry, tmp_path: Path) -> tuple[dict, dict[str, bytes]]:
    archive = export_archive(reg, "sentiment", tmp_path / "good.tar.gz").path
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    return json.loads(members.pop(MANIFEST)), members


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: b"[" * 100_000,
        lambda m: b"\xff\xfe not utf-8",
        lambda m: [],
        lambda m: {**m, "adapter": "x"},
        lambda m: {**m, "adapter": {**m["adapter"], "files": None}},
        lambda m: {**m, "adapter": {**m["adapter"], "files": {}}},
        lambda m: {**m, "adapter": {**m["adapter"], "files": {CONFIG_FILE: 1, WEIGHTS_FILE: 2}}},
        lambda m: {**m, "adapter": {**m["adapter"], "files": {**m["adapter"]["files"], WEIGHTS_FILE: {"sha256": 5}}}},
        lambda m: {**m, "adapter": {**m["adapter"], "name": 7}},
        lambda m: {**m, "adapter": {**m["adapter"], "lineage": "x"}},
        lambda m: {**m, "adapter": {k: v for k, v in m["adapter"].items() if k not in ("id", "ref", "created_at")}},
    ],
)
def test_a_malformed_manifest_is_invalid_adapter(reg, tmp_path, mutate):
    manifest, files = _good_manifest(reg, tmp_path)
    bad = mutate(json.loads(json.dumps(manifest)))
    archive = _archive(tmp_path / "bad.tar.gz", bad, files)
    if isinstance(bad, dict) and isinstance(bad.get("adapter"), dict) and "id" not in bad["adapter"]:
        # id, ref and created_at are optional: an archive without them imports
        assert import_archive(reg, archive, name="copy").ref == "copy@1"
        return
    with pytest.raises(InvalidAdapter, match="lora-kit-adapter.json|not a readable lora-kit archive"):
        import_archive(reg, archive)


def test_archive_members_are_capped_by_the_manifest_and_the_limit(reg, tmp_path, monkeypatch):
    manifest, files = _good_manifest(reg, tmp_path)
    big = {**files, WEIGHTS_FILE: files[WEIGHTS_FILE] + b"\0" * (1 << 20)}  # more than declared
    with pytest.raises(InvalidAdapter, match="more than its manifest declares"):
        import_archive(reg, _archive(tmp_path / "big.tar.gz", manifest, big))
    # A member over the hard limit is refused while reading, before it is written whole.
    monkeypatch.setattr(export_mod, "MAX_MEMBER_BYTES", 1000)
    written = []
    real = export_mod._copy_capped

    def spy(fh, out, cap, what):
        try:
            real(fh, out, cap, what)
        finally:
            written.append(out.tell())

    monkeypatch.setattr(export_mod, "_copy_capped", spy)
    bomb = {WEIGHTS_FILE: b"\0" * (8 << 20)}
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz") as tar:  # the file before its manifest
        for name, data in bomb.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(InvalidAdapter, match="refused"):
        import_archive(reg, tmp_path / "bomb.tar.gz")
    assert all(n <= 1000 for n in written)
    assert not list((reg.root / "tmp").iterdir())


def test_a_killed_registration_leaves_no_staging_dir_past_the_next_write(reg, adapters):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = [reg.root / "tmp" / f"{kind}-{dead.pid}-deadbeef" for kind in ("stage", "import", "vdir")]
    for d in leftovers:
        d.mkdir()
        (d / WEIGHTS_FILE).write_bytes(b"\0" * 100)
    reg.register(adapters[1], "other")  # a registration, not an `rm`, cleans them
    assert not any(d.exists() for d in leftovers)


def test_api_token_flag_warns_and_its_help_names_the_env_var(monkeypatch, caplog):
    import argparse

    from lora_kit.cli import build_parser
    from lora_kit.cli import serve as serve_cli
    from lora_kit.server import main as server_main

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert "LORA_KIT_API_TOKEN" in help_text and "ps" in help_text
    monkeypatch.setattr(server_main, "serve", lambda server, engine, replicas: 0)
    with caplog.at_level(logging.WARNING):
        assert serve_cli.cmd_serve(argparse.Namespace(api_token="s3cret")) == 0
    assert any("LORA_KIT_API_TOKEN" in r.getMessage() and "s3cret" not in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        serve_cli.cmd_serve(argparse.Namespace(api_token=None))
    assert not caplog.records


def test_hide_paths_cuts_known_dirs_with_spaces_and_every_other_absolute_path():
    from lora_kit.errors import hide_paths

    known = "/srv/my uploads/ft 1"
    message = f"{known}/adapter_config.json: bad JSON; see {known} and /srv/registry/blobs/ab/abcd"
    assert hide_paths(message, [known]) == "adapter_config.json: bad JSON; see ft 1 and abcd"
    assert hide_paths({"a": [message]}, [known]) == {"a": [hide_paths(message, [known])]}
    assert (
        hide_paths("positive / negative, data/x.jsonl, http://h/a") == "positive / negative, data/x.jsonl, http://h/a"
    )
