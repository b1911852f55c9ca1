"""Issue 29, hardening round 2: the runtime adapter API, mixes, metrics labels, unsupported OpenAI
fields, cross-site management requests and huge JSON integers, on a real server on 127.0.0.1.

One engine (the tiny Mistral, ``max_rank`` 4) serves ``prod@1`` (alias ``stable``), ``a1`` and
``a2``; the managed server has ``--enable-management`` and an adapter root, no token. Every test
leaves the registry and the served set as it found them (``world`` checks it after each test).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from helpers import make_adapter

from lora_kit.registry import Registry

MODEL = "tiny-mistral"
ACCOUNT = "acc"
RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
FINETUNES = f"/client/v4/accounts/{ACCOUNT}/ai/finetunes"
HUGE = "9" * 5000  # past Python's 4,300-digit int-string limit


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_mistral_dir, word_tokenizer):
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    root = tmp_path_factory.mktemp("hardening2")
    reg = Registry(root / "registry")
    prod = reg.register(make_adapter(tiny_mistral_dir, root / "prod", seed=1, r=4), "prod")
    reg.tag(prod.ref, "stable")
    reg.register(make_adapter(tiny_mistral_dir, root / "a1", seed=2, r=2), "a1")
    reg.register(make_adapter(tiny_mistral_dir, root / "a2", seed=3, r=2), "a2")
    adapter_root = root / "adapters"
    adapter_root.mkdir()
    make_adapter(tiny_mistral_dir, adapter_root / "rank8", seed=4, r=8)
    make_adapter(tiny_mistral_dir, adapter_root / "fresh", seed=5, r=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    engine = Engine(
        EngineConfig(model=MODEL, max_slots=2, max_rank=4),
        model=model,
        tokenizer=word_tokenizer,
        registry_root=reg.root,
    )
    engine.start()
    config = ServerConfig(
        uploads_dir=root / "uploads", max_tokens_cap=2, enable_management=True, adapter_roots=[str(adapter_root)]
    )
    app = create_app(engine, reg, config)
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
            yield {"http": http, "registry": reg, "root": adapter_root, "base": tiny_mistral_dir, "tmp": root}
    finally:
        engine.stop(10)


def versions(reg: Registry) -> list[str]:
    return sorted(v.ref for v in reg.list())


def run(http: httpx.Client, lora, **extra) -> httpx.Response:
    return http.post(RUN, json={"prompt": "hello", "lora": lora, "max_tokens": 1, **extra})


def load(http: httpx.Client, name: str, path=None) -> httpx.Response:
    body = {"lora_name": name} if path is None else {"lora_name": name, "lora_path": str(path)}
    return http.post("/v1/load_lora_adapter", json=body)


def assert_bad_input(resp: httpx.Response, *needles: str) -> str:
    """A 5006/400 in OpenAI's error body carrying X-Request-Id; the message, which names no path."""
    assert resp.status_code == 400, resp.text
    assert resp.headers.get("x-request-id"), resp.headers
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "5006", error
    for needle in needles:
        assert needle in error["message"], error["message"]
    assert "/tmp" not in resp.text and "/etc" not in resp.text, resp.text
    return error["message"]


# -- data and availability -------------------------------------------------------------------------


def test_a_refused_load_changes_nothing(world):
    """Item 1: prod@1 keeps serving under every name after a rank-8 load of ``prod`` is refused."""
    http, reg = world["http"], world["registry"]
    before = versions(reg)
    message = assert_bad_input(load(http, "prod", world["root"] / "rank8"), "rank 8", "max rank 4")
    assert "prod" in message
    assert versions(reg) == before  # no prod@2 left behind
    for ref in ("prod", "prod@1", "prod:stable"):
        assert run(http, ref).status_code == 200, ref
    assert reg.resolve("prod").version == 1


def test_load_and_unload_take_bare_names_only(world):
    """Item 2: NAME@VERSION and NAME:ALIAS are refused (400) by both routes, and nothing changes."""
    http, reg = world["http"], world["registry"]
    before = versions(reg)
    for ref in ("prod@1", "prod:stable"):
        assert_bad_input(http.post("/v1/unload_lora_adapter", json={"lora_name": ref}), "name")
        assert_bad_input(load(http, ref), "name")
        assert_bad_input(load(http, ref, world["root"] / "fresh"), "name")
    assert versions(reg) == before
    assert run(http, "prod").status_code == 200


def test_concurrent_identical_loads_add_one_version(world):
    """Item 3: six parallel loads of the same files register one version; a seventh adds none."""
    http, reg = world["http"], world["registry"]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: load(http, "fresh", world["root"] / "fresh"), range(6)))
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert [v.ref for v in reg.list() if v.name == "fresh"] == ["fresh@1"]
    assert load(http, "fresh", world["root"] / "fresh").status_code == 200
    assert [v.ref for v in reg.list() if v.name == "fresh"] == ["fresh@1"]
    assert run(http, "fresh").status_code == 200
    reg.remove("fresh@1")


def test_models_do_not_list_unloaded_adapters(world):
    """Item 4: /v1/models drops an unloaded adapter's ids and lists them again once it is loaded."""
    http = world["http"]

    def ids() -> set[str]:
        return {m["id"] for m in http.get("/v1/models").json()["data"]}

    assert {"a2", "a2@1"} <= ids()
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    try:
        assert not {"a2", "a2@1"} & ids()
        assert {"a1", "a1@1", MODEL} <= ids()
    finally:
        assert load(http, "a2").status_code == 200
    assert {"a2", "a2@1"} <= ids()


# -- bad input is a 4xx --------------------------------------------------------------------------


def _with_config(base, out, **changes):
    """A valid rank-2 adapter at ``out`` whose config gets ``changes`` (written as JSON text)."""
    make_adapter(base, out, seed=9, r=2)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _raw_config(base, out, text):
    make_adapter(base, out, seed=9, r=2)
    (out / "adapter_config.json").write_text(text)
    return out


def _pickled(base, out):
    make_adapter(base, out, seed=9, r=2)
    (out / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, out / "adapter_model.bin")
    return out


def _wrong_shapes(base, out):
    from safetensors.torch import load_file, save_file

    make_adapter(base, out, seed=9, r=2)
    tensors = load_file(out / "adapter_model.safetensors")
    name = next(k for k in tensors if "lora_A" in k)
    tensors[name] = torch.zeros(2, 7)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def _system_file(base, out):
    make_adapter(base, out, seed=9, r=2)
    (out / "adapter_config.json").unlink()
    (out / "adapter_config.json").symlink_to("/etc/passwd")
    return out


def _empty(base, out):
    out.mkdir()
    return out


def _link_to_etc(base, out):
    out.symlink_to("/etc", target_is_directory=True)
    return out


BAD_DIRS = {
    "pickled": _pickled,
    "malformed-json": lambda b, o: _raw_config(b, o, '{"r": 2, '),
    "deeply-nested": lambda b, o: _raw_config(b, o, '{"r": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    "string-r": lambda b, o: _with_config(b, o, r="8"),
    "negative-r": lambda b, o: _with_config(b, o, r=-1),
    "huge-r": lambda b, o: _with_config(b, o, r=10**6),
    "nan-alpha": lambda b, o: _raw_config(
        b, o, json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})[:-1] + ', "lora_alpha": NaN}'
    ),
    "wrong-shapes": _wrong_shapes,
    "empty": _empty,
    "system-file": _system_file,
    "link-to-etc": _link_to_etc,
}


@pytest.mark.parametrize("case", sorted(BAD_DIRS))
def test_every_invalid_directory_is_a_400_that_changes_nothing(world, case):
    """Item 5: each invalid adapter directory under the root is 5006/400 with a request id, no path,
    no version and no change to what is served."""
    http, reg = world["http"], world["registry"]
    out = world["root"] / f"bad-{case}"
    BAD_DIRS[case](world["base"], out)
    before = versions(reg)
    try:
        assert_bad_input(load(http, f"bad-{case}", out))
        assert_bad_input(load(http, "prod", out))  # over a served name: prod stays as it is
    finally:
        if out.is_symlink() or out.is_file():
            out.unlink()
        else:
            shutil.rmtree(out)
    assert versions(reg) == before
    assert run(http, "prod").status_code == 200


def test_etc_and_a_missing_directory_answer_alike(world):
    """Item 5: no oracle: a system directory and a missing one get the same answer."""
    http = world["http"]
    answers = [load(http, "x", path) for path in ("/etc", "/nonexistent-dir-zz", str(world["root"] / "missing"))]
    for resp in answers[:2]:
        assert_bad_input(resp)
    assert answers[0].json()["error"]["message"] == answers[1].json()["error"]["message"]


def test_an_internal_error_carries_its_request_id(tmp_path, tiny_mistral_dir, word_tokenizer):
    """Item 5: a 5xx names its request id in the body and in X-Request-Id. A registry whose listing
    fails stands in for a crash (no real input makes this server crash)."""
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    class BrokenRegistry(Registry):
        def list(self, *args, **kwargs):
            raise RuntimeError("disk on fire at /srv/secret")

    class NoEngine:
        model_name = MODEL
        tokenizer = word_tokenizer

        def stats(self):
            return {}

    app = create_app(NoEngine(), BrokenRegistry(tmp_path / "reg"), ServerConfig(uploads_dir=tmp_path / "up"))
    with BackgroundServer(app) as srv:
        for path in ("/v1/models", "/v1/lora-kit/adapters"):
            resp = httpx.get(srv.url + path)
            assert resp.status_code == 500, resp.text
            rid = resp.headers.get("x-request-id")
            assert rid and rid in resp.json()["error"]["message"], (resp.headers, resp.text)
            assert "fire" not in resp.text and "secret" not in resp.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (RUN, '{"prompt": "x", "seed": %s}', "seed"),
        (RUN, '{"prompt": "x", "lora": [{"name": "a1", "scale": %s}]}', "lora[0].scale"),
        (
            "/v1/chat/completions",
            '{"model": "tiny-mistral", "messages": [{"role": "user", "content": "x"}], "seed": %s}',
            "seed",
        ),
        ("/v1/completions", '{"model": "tiny-mistral", "prompt": "x", "max_tokens": %s}', "max_tokens"),
        ("/v1/load_lora_adapter", '{"lora_name": "a1", "lora_int_id": %s}', "lora_int_id"),
        (FINETUNES, '{"model": "tiny-mistral", "name": "x", "extra": {"deep": [1, %s]}}', "extra.deep[1]"),
    ],
)
def test_a_huge_json_integer_is_a_400_naming_its_field(world, path, body, field):
    """Item 6: a 5,000-digit integer anywhere in a JSON body is 5006/400 naming its field."""
    resp = world["http"].post(path, content=(body % HUGE).encode(), headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    text = json.dumps(resp.json())
    assert field in text and "digits" in text, text
    assert HUGE[:50] not in text


def test_a_runtime_load_caps_the_config_size(world):
    """Item 7: a 2 MiB adapter_config.json is refused (the upload cap, 1 MiB) and not stored."""
    http, reg = world["http"], world["registry"]
    out = _with_config(world["base"], world["root"] / "big-config", description="x" * (2 << 20))
    before = versions(reg)
    try:
        assert_bad_input(load(http, "big", out), "adapter_config.json", "1048576")
    finally:
        shutil.rmtree(out)
    assert versions(reg) == before


# -- limits that hold ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mix",
    [
        [{"name": "a1", "scale": 2}, {"name": "a1", "scale": 2}],
        [{"name": "a1", "scale": 1}, {"name": "a1@1", "scale": 1}],
        [{"name": "a1", "scale": "0.5"}],
        [{"name": "a1", "scale": True}],
    ],
)
def test_a_mix_takes_each_adapter_once_and_numbers_only(world, mix):
    """Item 9: duplicates (by name or by what they resolve to) and non-number scales are 400s."""
    resp = run(world["http"], mix)
    assert resp.status_code == 400, resp.text
    assert resp.json()["success"] is False


def test_metrics_label_a_mix_canonically_and_bound_the_labels(world):
    """Item 10: one series for a mix in any order or weighting; no client text in the labels."""
    http = world["http"]
    for mix in (
        [{"name": "a2", "scale": 0.5}, {"name": "a1", "scale": 0.5}],
        [{"name": "a1", "scale": 0.25}, {"name": "a2", "scale": 0.75}],
        [{"name": "a1@1", "scale": 0.5}, {"name": "a2:latest-nope", "scale": 0.5}],  # refused: unknown alias
    ):
        run(http, mix)
    assert run(http, "never-such-adapter-zz").status_code == 404
    text = http.get("/metrics").text
    mixes = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines() if 'adapter="a' in line}
    assert mixes <= {"a1@1+a2@1", "a1@1", "a2@1"}, mixes
    assert "a1@1+a2@1" in mixes
    assert "never-such-adapter-zz" not in text and "latest-nope" not in text


def test_metrics_bound_the_adapter_label_set():
    """Item 10: past the cap, new adapter labels share one overflow label."""
    from lora_kit.server.metrics import MAX_ADAPTER_LABELS, OVERFLOW_LABEL, Metrics

    metrics = Metrics()
    for i in range(MAX_ADAPTER_LABELS + 50):
        metrics.record_request("openai.completions", f"ad{i}@1", 200, 0.1)
        metrics.record_tokens(f"ad{i}@1", 3, 1)
        metrics.record_first_token(f"ad{i}@1", 0.1)
    text = metrics.render()
    labels = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines() if 'adapter="' in line}
    assert len(labels) == MAX_ADAPTER_LABELS + 1 and OVERFLOW_LABEL in labels
    assert f'lora_kit_generated_tokens_total{{adapter="{OVERFLOW_LABEL}"}} 50' in text
    metrics.record_request("openai.completions", "ad0@1", 200, 0.1)  # a known label keeps its series
    assert 'adapter="ad0@1",route="openai.completions",status="200"} 2' in metrics.render()


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "logprobs", True),
        ("/v1/chat/completions", "top_logprobs", 2),
        ("/v1/completions", "logprobs", 1),
        ("/v1/completions", "echo", True),
        ("/v1/completions", "best_of", 2),
    ],
)
def test_unimplemented_openai_fields_are_refused(world, path, field, value):
    """Item 11: fields whose answer the server cannot give are 400s naming the field."""
    body = {"model": MODEL, "max_tokens": 1, field: value}
    body.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"})
    resp = world["http"].post(path, json=body)
    assert_bad_input(resp, field)
    neutral = (
        {"logprobs": False, "top_logprobs": None, "echo": False, "best_of": 1}[field]
        if path.endswith("chat/completions") or field != "logprobs"
        else None
    )
    assert world["http"].post(path, json={**body, field: neutral}).status_code == 200


# -- clear and closed ------------------------------------------------------------------------------


def test_management_refuses_cross_site_requests(world):
    """Item 12: without a token, a JSON management route needs application/json, and every
    management route refuses a foreign Origin or Host (DNS rebinding), so a page cannot drive it."""
    http, reg = world["http"], world["registry"]
    before = versions(reg)
    body = json.dumps({"lora_name": "a2"})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        resp = http.post("/v1/unload_lora_adapter", content=body, headers=headers)
        assert resp.status_code == 415, resp.text
        assert "application/json" in resp.json()["error"]["message"]
    foreign = [{"origin": "http://evil.example"}, {"host": "evil.example"}, {"origin": "null"}]
    for headers in foreign:
        resp = http.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}, headers=headers)
        assert resp.status_code == 403, (headers, resp.text)
        resp = http.post(FINETUNES, json={"model": MODEL, "name": "evil"}, headers=headers)
        assert resp.status_code == 403 and resp.json()["success"] is False, resp.text
        resp = http.post(FINETUNES + "/x/finetune-assets", files={"file": ("f", b"{}")}, headers=headers)
        assert resp.status_code == 403, resp.text
    assert run(http, "a2").status_code == 200  # still served
    assert versions(reg) == before
    same_origin = {"origin": str(http.base_url).rstrip("/")}
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "a2"}, headers=same_origin).status_code == 200


def test_the_model_lora_conflict_speaks_the_api(world):
    """Item 15: no Python repr in the message; the mix in the API's words."""
    resp = world["http"].post(
        "/v1/completions",
        json={"model": "a1", "prompt": "x", "lora": [{"name": "a2", "scale": 0.5}]},
    )
    message = assert_bad_input(resp, "a2", "0.5")
    assert "LoraWeight" not in message and "name=" not in message


def test_after_all_the_world_is_intact(world):
    http, reg = world["http"], world["registry"]
    assert versions(reg) == ["a1@1", "a2@1", "prod@1"]
    for ref in ("prod", "prod:stable", "a1", "a2"):
        assert run(http, ref).status_code == 200, ref
    assert math.isfinite(float(http.get("/healthz").json().get("slots", 0)))
    assert os.path.isdir(world["root"])
