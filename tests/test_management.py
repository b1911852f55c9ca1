"""The management routes are closed by default (issue 26, item 13).

Creating fine-tunes, uploading their files and vLLM's runtime load/unload are off (3051/403, in
each route's error shape) on a server without an API token unless it was started with
``--enable-management``; with a token they need it. ``lora_path`` must lie under an adapter root
(symlinks resolved), and a refusal names no server path. ``lora-kit serve`` refuses a non-loopback
``--host`` without a token unless ``--allow-unauthenticated`` is given. Real servers on 127.0.0.1
over the tiny Mistral, called with raw httpx and the official SDKs.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from helpers import make_adapter

from lora_kit.registry import Registry

MODEL = "tiny-mistral"
ACCOUNT = "acc"
FINETUNES = f"/client/v4/accounts/{ACCOUNT}/ai/finetunes"
RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_mistral_dir, word_tokenizer):
    """One engine behind three servers: closed (the default), managed (``--enable-management`` and an
    adapter root) and one with a token; adapters inside the root, outside it, and a symlink out."""
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    root = tmp_path_factory.mktemp("management")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    reg = Registry(root / "registry")
    reg.register(make_adapter(tiny_mistral_dir, root / "known", seed=1), "known")
    adapter_root = root / "adapters"
    adapter_root.mkdir()
    inside = make_adapter(tiny_mistral_dir, adapter_root / "inside", seed=2)
    outside = make_adapter(tiny_mistral_dir, elsewhere / "foreign-adapter", seed=3)
    (adapter_root / "link").symlink_to(outside, target_is_directory=True)  # in the root by name only
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    engine = Engine(
        EngineConfig(model=MODEL, max_slots=2), model=model, tokenizer=word_tokenizer, registry_root=reg.root
    )
    engine.start()
    uploads = root / "uploads"
    apps = {
        "closed": create_app(engine, reg, ServerConfig(uploads_dir=uploads / "closed", max_tokens_cap=4)),
        "managed": create_app(
            engine,
            reg,
            ServerConfig(
                uploads_dir=uploads / "managed", max_tokens_cap=4, enable_management=True, adapter_roots=[adapter_root]
            ),
        ),
        "token": create_app(
            engine, reg, ServerConfig(uploads_dir=uploads / "token", max_tokens_cap=4, api_token=TOKEN)
        ),
    }
    try:
        with (
            BackgroundServer(apps["closed"]) as closed,
            BackgroundServer(apps["managed"]) as managed,
            BackgroundServer(apps["token"]) as token,
        ):
            yield {
                "urls": {"closed": closed.url, "managed": managed.url, "token": token.url},
                "registry": reg,
                "uploads": uploads,
                "root": adapter_root,
                "inside": inside,
                "outside": outside,
                "tmp": root.parent,
            }
    finally:
        engine.stop(10)


def names(reg: Registry) -> set[str]:
    return {v.name for v in reg.list()}


def assert_management_off(resp: httpx.Response, openai_shape: bool) -> None:
    assert resp.status_code == 403, resp.text
    if openai_shape:
        error = resp.json()["error"]
        assert error["type"] == "permission_error" and error["code"] == "management_disabled"
        message = error["message"]
    else:
        body = resp.json()
        assert body["success"] is False and body["result"] is None and len(body["errors"]) == 1
        assert body["errors"][0]["code"] == 3051
        message = body["errors"][0]["message"]
    assert "--enable-management" in message and "LORA_KIT_API_TOKEN" in message


def test_a_server_without_token_or_flag_refuses_every_management_route(world):
    import cloudflare

    reg, before = world["registry"], names(world["registry"])
    with httpx.Client(base_url=world["urls"]["closed"], timeout=60) as http:
        assert_management_off(http.post(FINETUNES, json={"model": MODEL, "name": "sneaky"}), openai_shape=False)
        upload = http.post(
            FINETUNES + "/00000000-0000-4000-8000-000000000000/finetune-assets",
            data={"file_name": "adapter_config.json"},
            files={"file": ("c.json", b"{}")},
        )
        assert_management_off(upload, openai_shape=False)
        load = {"lora_name": "sneaky", "lora_path": str(world["inside"])}
        assert_management_off(http.post("/v1/load_lora_adapter", json=load), openai_shape=True)
        assert_management_off(http.post("/v1/unload_lora_adapter", json={"lora_name": "known"}), openai_shape=True)
        # Nothing was written or unloaded; reading and inference stay open.
        assert names(reg) == before and not (world["uploads"] / "closed").exists()
        served = http.post(RUN, json={"prompt": "hi", "max_tokens": 2, "lora": "known"})
        assert served.status_code == 200, served.text
        assert http.get(FINETUNES).status_code == 200 and http.get("/v1/models").status_code == 200
    cf = cloudflare.Cloudflare(api_token="any", base_url=world["urls"]["closed"] + "/client/v4", max_retries=0)
    with pytest.raises(cloudflare.PermissionDeniedError) as err:
        cf.ai.finetunes.create(account_id=ACCOUNT, model=MODEL, name="sneaky")
    assert err.value.body["errors"][0]["code"] == 3051


def test_a_token_turns_management_on_behind_it(world):
    import cloudflare

    url = world["urls"]["token"]
    with httpx.Client(base_url=url, timeout=60) as anonymous:
        assert anonymous.post(FINETUNES, json={"model": MODEL, "name": "t"}).status_code == 401
        assert anonymous.post("/v1/load_lora_adapter", json={"lora_name": "known"}).status_code == 401
    cf = cloudflare.Cloudflare(api_token=TOKEN, base_url=url + "/client/v4", max_retries=0)
    assert cf.ai.finetunes.create(account_id=ACCOUNT, model=MODEL, name="with-token").name == "with-token"
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "known"}).status_code == 200
        # No --adapter-root: a registered name loads, a directory does not.
        refused = http.post("/v1/load_lora_adapter", json={"lora_name": "dir", "lora_path": str(world["inside"])})
        assert refused.status_code == 400 and "--adapter-root" in refused.json()["error"]["message"]
        assert str(world["tmp"]) not in refused.text
    assert "dir" not in names(world["registry"])


def test_the_flag_opens_management_without_a_token(world):
    with httpx.Client(base_url=world["urls"]["managed"], timeout=60) as http:
        created = http.post(FINETUNES, json={"model": MODEL, "name": "flagged"})
        assert created.status_code == 200 and created.json()["result"]["name"] == "flagged"
        resp = http.post("/v1/load_lora_adapter", json={"lora_name": "inside", "lora_path": str(world["inside"])})
        assert resp.status_code == 200, resp.text
    assert "inside" in names(world["registry"])


def test_lora_path_must_resolve_under_an_adapter_root(world):
    root, outside = world["root"], world["outside"]
    refused = {
        "outside": str(outside),
        "symlink out": str(root / "link"),
        "dot-dot out": f"{root}/../../{outside.parent.name}/{outside.name}",
        "relative": "adapters/inside",
        "missing": str(root / "missing"),
        "the root's parent": str(root.parent),
    }
    before = names(world["registry"])
    with httpx.Client(base_url=world["urls"]["managed"], timeout=60) as http:
        for why, path in refused.items():
            resp = http.post("/v1/load_lora_adapter", json={"lora_name": "escape", "lora_path": path})
            assert resp.status_code == 400, (why, resp.text)
            assert resp.json()["error"]["param"] == "lora_path", why
            assert str(world["tmp"]) not in resp.text and outside.name not in resp.text, (why, resp.text)
        assert (
            "outside the server's adapter roots"
            in http.post("/v1/load_lora_adapter", json={"lora_name": "escape", "lora_path": str(outside)}).json()[
                "error"
            ]["message"]
        )
    assert names(world["registry"]) == before


@pytest.mark.parametrize(
    ("host", "flags", "env_token", "served"),
    [
        ("0.0.0.0", [], None, False),
        ("::", [], None, False),
        ("192.0.2.7", [], None, False),
        ("0.0.0.0", ["--allow-unauthenticated"], None, True),
        ("0.0.0.0", [], "tok", True),
        ("127.0.0.1", [], None, True),
        ("::1", [], None, True),
        ("localhost", [], None, True),
    ],
)
def test_serve_refuses_a_public_host_without_a_token(monkeypatch, capsys, host, flags, env_token, served):
    from lora_kit.cli import main
    from lora_kit.server import main as server_main

    calls = []
    monkeypatch.setattr(server_main, "serve", lambda server, engine, replicas: calls.append(server) or 0)
    if env_token:
        monkeypatch.setenv("LORA_KIT_API_TOKEN", env_token)
    else:
        monkeypatch.delenv("LORA_KIT_API_TOKEN", raising=False)
    status = main(["serve", "--host", host, "--port", "0", *flags])
    if served:
        assert status == 0 and len(calls) == 1
        assert calls[0].host == host and calls[0].api_token == env_token  # the token from the environment
    else:
        assert status == 2 and calls == []
        assert "--allow-unauthenticated" in capsys.readouterr().err
