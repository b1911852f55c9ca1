"""The playground page at ``/``, driven in a real browser (headless Chromium from Debian's ``chromium``
package, through Playwright) against a real server on 127.0.0.1: the embedded SmolLM2-135M-Instruct
and a ``sentiment`` adapter trained from the demo recipe (cut down to a few steps; the run is cached
in ``LORA_KIT_HOME/runs`` by its recipe hash, so only the first run of the suite trains).

Screenshots of each view go to ``tests/.artifacts/``; with ``LORA_KIT_DOCS_SCREENSHOTS=1`` the
compare and registry ones are copied to ``docs/`` for the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the dev extra is not installed: the browser tests skip (NO_BROWSER)
    expect = sync_playwright = None

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
TOKEN = "s3cret-playground"
ARTIFACTS = ROOT / "tests" / ".artifacts"
NEGATIVE_REVIEW = "Classify the sentiment of this review: The suitcase arrived with a broken wheel and the seller never answered my emails."
# The demo recipe, cut down so a CPU trains it in about a minute; still the real trainer and data.
RECIPE_OVERRIDES = [
    "model.quantization=none",
    "data.max_seq_len=128",
    "train.micro_batch_size=2",
    "train.max_steps=10",
    "train.learning_rate=0.003",
    "train.warmup_steps=1",
    "train.eval_every=1000",
    "train.checkpoint_every=1000",
    "eval.max_examples=4",
    "eval.max_new_tokens=4",
    "output.register_adapter=false",
]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

NO_BROWSER = (
    "no chromium on PATH: install Debian's package (apt-get install chromium; .ci/run does) to run the browser tests"
    if CHROMIUM is None
    else "playwright is missing: pip install -e '.[dev]'"
    if sync_playwright is None
    else None
)


def trained_sentiment_run() -> Path:
    """The run directory of the cut-down demo recipe: reused when a finished run of this exact recipe
    (and this lineage format, with a loss curve) is there, else trained now."""
    from lora_kit.training import recipe as recipe_mod
    from lora_kit.training.trainer import run_dir_for, train

    recipe = recipe_mod.load(ROOT / "recipes" / "demo-sentiment.yaml", RECIPE_OVERRIDES)
    run_dir = run_dir_for(recipe)
    lineage_file = run_dir / "lineage.json"
    if (run_dir / "done.json").exists() and lineage_file.exists():
        lineage = json.loads(lineage_file.read_text())
        if lineage.get("recipe_hash") == recipe.content_hash() and lineage.get("metrics", {}).get("loss_curve"):
            return run_dir
    return train(recipe, resume=False).run_dir


def registry_with_sentiment(root: Path):
    """A registry at ``root`` holding the trained run's adapter as ``sentiment@1`` (alias ``prod``), with its lineage."""
    from lora_kit.registry import Registry
    from lora_kit.registry.lineage import COMPUTED_KEYS

    run_dir = trained_sentiment_run()
    registry = Registry(root)
    facts = {k: v for k, v in json.loads((run_dir / "lineage.json").read_text()).items() if k not in COMPUTED_KEYS}
    registry.register(
        run_dir / "adapter", "sentiment", base_model=MODEL, description="review -> positive | negative", lineage=facts
    )
    registry.tag("sentiment@1", "prod")
    return registry


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry holding ``sentiment@1`` (trained, with its lineage); one engine; an open server, a
    server with a token, and one without the page."""
    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    root = tmp_path_factory.mktemp("playground")
    registry = registry_with_sentiment(root / "registry")
    engine = Engine(EngineConfig(MODEL, max_slots=2, max_batch=4, max_queue=16), registry_root=registry.root)
    engine.start()
    apps = {
        "open": create_app(engine, registry, ServerConfig(uploads_dir=root / "uploads", max_tokens_cap=64)),
        "token": create_app(
            engine, registry, ServerConfig(api_token=TOKEN, uploads_dir=root / "uploads", max_tokens_cap=64)
        ),
        "no_ui": create_app(engine, registry, ServerConfig(uploads_dir=root / "uploads", serve_ui=False)),
    }
    try:
        with (
            BackgroundServer(apps["open"]) as srv,
            BackgroundServer(apps["token"]) as tsrv,
            BackgroundServer(apps["no_ui"]) as nsrv,
        ):
            yield {"url": srv.url, "token_url": tsrv.url, "no_ui_url": nsrv.url, "registry": registry, "root": root}
    finally:
        engine.stop(10)


@pytest.fixture(scope="module")
def browser():
    if NO_BROWSER:
        pytest.skip(NO_BROWSER)
    expect.set_options(timeout=120_000)  # a CPU shared with other work generates slowly
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, world):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)  # a CPU shared with other work generates slowly
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"playground-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5000  # a rendered page, not a blank image
    if os.environ.get("LORA_KIT_DOCS_SCREENSHOTS") == "1" and name in ("compare", "registry"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(path, ROOT / "docs" / path.name)
    return path


def column(page, n: int):
    return page.locator(f'[data-column="{n}"]')


def run_compare(page, prompt: str, max_tokens: int = 16) -> None:
    """Type the prompt, cap every column's tokens, run, and wait until no column is running."""
    page.get_by_label("Prompt").fill(prompt)
    for box in page.get_by_label(re.compile(r"^Max tokens")).all():
        box.fill(str(max_tokens))
    page.get_by_role("button", name="Run all columns").click()
    expect(page.locator('[data-column][data-state="running"]')).to_have_count(0)
    expect(page.get_by_role("button", name="Run all columns")).to_be_enabled()


def chat(url: str, lora, max_tokens: int = 16, token: str | None = None) -> httpx.Response:
    """The request a column sends, without streaming, straight through the API."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": NEGATIVE_REVIEW}], "temperature": 0}
    body["max_tokens"] = max_tokens
    if lora is not None:
        body["lora"] = lora
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


# -- compare -----------------------------------------------------------------------------------


def test_compare_base_and_sentiment_side_by_side(page, world):
    page.goto(world["url"] + "/")
    assert page.get_by_label("Model or adapter (column 1)").input_value() == "base"
    assert page.get_by_label("Model or adapter (column 2)").input_value() == "sentiment"
    run_compare(page, NEGATIVE_REVIEW)

    base, tuned = column(page, 1), column(page, 2)
    assert base.get_attribute("data-state") == tuned.get_attribute("data-state") == "done"
    tuned_text = tuned.locator("output").inner_text().strip()
    base_text = base.locator("output").inner_text().strip()
    assert tuned_text == "negative"
    assert base_text and base_text != tuned_text
    # What the page streamed is what the API answers to the same (greedy) request, usage included.
    for col, lora, text in ((base, None, base_text), (tuned, "sentiment", tuned_text)):
        answer = chat(world["url"], lora).json()
        assert answer["choices"][0]["message"]["content"].strip() == text
        usage = answer["usage"]
        stats = col.locator(".stats").inner_text()
        assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens" in stats
        assert re.search(r"[\d.]+ tokens/s", stats)
    screenshot(page, "compare")


def test_copy_snippets_carry_the_columns_request(page, world):
    page.goto(world["url"] + "/")
    tuned = column(page, 2)
    tuned.get_by_label("Temperature (column 2)").fill("0.5")
    tuned.get_by_role("button", name="Copy as curl").click()
    curl = tuned.locator("pre.snippet").inner_text()
    assert curl.startswith(f"curl -N {world['url']}/v1/chat/completions")
    body = json.loads(re.search(r"-d '(.*)'$", curl, re.S).group(1))
    assert body["lora"] == "sentiment" and body["temperature"] == 0.5 and body["stream"] is True
    tuned.get_by_role("button", name="Copy as Python (cloudflare SDK)").click()
    python = tuned.locator("pre.snippet").inner_text()
    assert f'base_url="{world["url"]}/client/v4"' in python
    assert f'client.ai.run(\n    "{MODEL}",' in python and '    lora="sentiment",\n' in python
    compile(python, "snippet.py", "exec")  # valid Python


TRICKY_PROMPT = 'Answer: false, true or null? {"ok": true, "x": null} \\ "quoted" é\u2028line — 😀'


def test_copy_as_python_sends_the_same_request_as_the_column(page, world):
    """The Python snippet, run (against a stand-in for the SDK that records its call), sends exactly
    the messages the column sends: `true`/`false`/`null` inside a string stay as typed."""
    page.goto(world["url"] + "/")
    page.get_by_label("Prompt").fill(TRICKY_PROMPT)
    tuned = column(page, 2)
    tuned.get_by_role("button", name="Copy as curl").click()
    curl = tuned.locator("pre.snippet").inner_text()
    sent = json.loads(re.search(r"-d '(.*)'$", curl, re.S).group(1).replace("'\"'\"'", "'"))
    assert sent["messages"][-1] == {"role": "user", "content": TRICKY_PROMPT}
    tuned.get_by_role("button", name="Copy as Python (cloudflare SDK)").click()
    python = tuned.locator("pre.snippet").inner_text()

    calls = []

    class Ai:
        def run(self, model, **kwargs):
            calls.append({"model": model, **kwargs})
            return {"response": ""}

    class Cloudflare:
        def __init__(self, **kwargs):
            self.ai = Ai()

    stub = type(sys)("cloudflare")
    stub.Cloudflare = Cloudflare
    saved = sys.modules.get("cloudflare")
    sys.modules["cloudflare"] = stub
    try:
        exec(compile(python, "snippet.py", "exec"), {"__name__": "snippet", "print": lambda *a: None})
    finally:
        if saved is None:
            del sys.modules["cloudflare"]
        else:
            sys.modules["cloudflare"] = saved
    (call,) = calls
    assert call["messages"] == sent["messages"]
    assert call["messages"][-1]["content"] == TRICKY_PROMPT
    assert call["lora"] == sent["lora"] == "sentiment" and call["model"] == sent["model"]


def test_unknown_adapter_shows_the_servers_error_in_its_column(page, world):
    page.goto(world["url"] + "/")
    page.get_by_label("Model or adapter (column 2)").fill("no-such-adapter")
    run_compare(page, "Hello", max_tokens=4)
    expected = chat(world["url"], "no-such-adapter")
    assert expected.status_code == 404
    message = expected.json()["error"]["message"]
    failed = column(page, 2).locator("output")
    assert column(page, 2).get_attribute("data-state") == "error"
    assert failed.inner_text() == f"Error: {message}"
    assert "no-such-adapter" in message
    assert column(page, 1).get_attribute("data-state") == "done"  # the other column is unaffected


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory):
    """``lora-kit serve --port 0`` in a subprocess, over a home whose registry holds ``sentiment``."""
    from lora_kit import paths

    home = tmp_path_factory.mktemp("cli-home")
    for shared in ("models", "kernels"):  # the converted model and the built kernel, not rebuilt
        if (paths.home() / shared).exists():
            (home / shared).symlink_to(paths.home() / shared)
    registry_with_sentiment(home / "registry")
    env = {**os.environ, "LORA_KIT_HOME": str(home)}
    env.pop("LORA_KIT_API_TOKEN", None)
    command = [sys.executable, "-m", "lora_kit", "serve", "--port", "0", "--max-tokens-cap", "16"]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited before serving"
        # Keep reading its log (one access line per request), so a full pipe never blocks the server.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield {"url": line.split(" on ")[1].split(" ")[0], "line": line}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_lora_kit_serve_serves_the_playground(page, cli_server):
    url = cli_server["url"]
    assert f"playground: {url}/" in cli_server["line"]
    page.goto(url + "/")
    run_compare(page, NEGATIVE_REVIEW, max_tokens=4)
    assert column(page, 2).locator("output").inner_text().strip() == "negative"
    assert column(page, 1).locator("output").inner_text().strip() not in ("", "negative")
    page.get_by_role("tab", name="Registry").click()
    page.get_by_role("button", name="sentiment@1, aliases prod").click()
    page.locator("#version-detail svg.loss-curve path.curve").wait_for()


# -- registry ----------------------------------------------------------------------------------


def test_registry_shows_lineage_and_draws_the_loss_curve(page, world):
    version = world["registry"].resolve("sentiment@1")
    metrics = version.lineage["metrics"]
    curve = metrics["loss_curve"]
    page.goto(world["url"] + "/")
    page.get_by_role("tab", name="Registry").click()
    page.get_by_role("button", name="sentiment@1, aliases prod").click()
    detail = page.locator("#version-detail")
    detail.get_by_role("heading", name="sentiment@1 (prod)").wait_for()
    text = detail.inner_text()
    assert "Base model\nsmollm2-135m-instruct" in text
    assert version.lineage["recipe_hash"][:16] in text
    assert version.lineage["dataset_fingerprint"][:16] in text
    held_out = f"base {metrics['base_exact_match'] * 100:.1f}% → adapter {metrics['eval_exact_match'] * 100:.1f}%"
    assert held_out in text
    assert f"{metrics['eval_loss']:.4f}" in text
    assert "Stored files match their sha256" in text
    path = detail.locator("svg.loss-curve path.curve").get_attribute("d")
    assert path.startswith("M") and path.count("L") == len(curve) - 1  # one segment per recorded point
    screenshot(page, "registry")


def test_registry_routes_hide_server_paths_and_answer_errors(world):
    with httpx.Client(base_url=world["url"], timeout=60) as http:
        listing = http.get("/v1/lora-kit/adapters").json()
        assert listing["data"][0]["name"] == "sentiment" and listing["data"][0]["aliases"] == {"prod": 1}
        detail = http.get("/v1/lora-kit/adapters/sentiment:prod")
        missing = http.get("/v1/lora-kit/adapters/nope")
        malformed = http.get("/v1/lora-kit/adapters/Not A Ref")
    assert detail.status_code == 200
    text = detail.text
    for secret in (str(world["root"]), str(Path.home()), os.environ["LORA_KIT_HOME"]):
        assert secret not in text
    assert not re.search(r'"/[^"]*/', text), "an absolute path leaked"
    lineage = detail.json()["lineage"]
    assert lineage["source_dir"] == "adapter" and lineage["base_model"]["local_dir"] == MODEL
    assert detail.json()["verify"] == {"ok": True, "problems": []}
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "no adapter 'nope' in the registry"
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "ref"


def test_strip_paths_cuts_absolute_paths_to_their_last_part():
    from lora_kit.errors import hide_paths as strip_paths

    given = {
        "a": "/srv/home/u/runs/sentiment-1a2b",
        "b": ["data/sentiment/train.jsonl", "mistralai/Mistral-7B-Instruct-v0.1", "http://x.org/a/b"],
        "c": "sentiment@1: adapter_model.safetensors is missing from the store (/srv/reg/blobs/ab/abcd)",
        "d": r"C:\Users\me\runs\x",
        "e": 3,
        "f": "positive / negative",
    }
    assert strip_paths(given) == {
        "a": "sentiment-1a2b",
        "b": ["data/sentiment/train.jsonl", "mistralai/Mistral-7B-Instruct-v0.1", "http://x.org/a/b"],
        "c": "sentiment@1: adapter_model.safetensors is missing from the store (abcd)",
        "d": "x",
        "e": 3,
        "f": "positive / negative",
    }


def test_the_trainer_records_the_loss_curve_in_lineage(world):
    """The registered loss curve is the run's per-step train loss from metrics.jsonl, point for point."""
    from lora_kit.training import recipe as recipe_mod
    from lora_kit.training.metrics import METRICS_FILE
    from lora_kit.training.trainer import run_dir_for

    version = world["registry"].resolve("sentiment")
    run_dir = run_dir_for(recipe_mod.load(ROOT / "recipes" / "demo-sentiment.yaml", RECIPE_OVERRIDES))
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    expected = [[r["step"], round(r["loss"], 6)] for r in rows if "loss" in r]
    assert version.lineage["metrics"]["loss_curve"] == expected
    assert [step for step, _ in expected] == list(range(1, 11))


def test_a_long_runs_loss_curve_is_downsampled_to_200_points(tmp_path):
    """``_final_metrics`` on a 450-step metrics file (a stand-in trainer: 450 real steps take too long)."""
    from types import SimpleNamespace

    from lora_kit.training.metrics import METRICS_FILE
    from lora_kit.training.trainer import Trainer

    records = [{"step": s, "loss": 10.0 / s, "lr": 1e-4} for s in range(1, 451)] + [{"step": 450, "eval_loss": 0.5}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    trainer = SimpleNamespace(
        run_dir=tmp_path,
        main=True,
        last_loss=10.0 / 450,
        total_steps=450,
        tokens_seen=0,
        t_loop=0.0,
        n_trainable=1,
        peak_rss_mb=1.0,
        _eval_loss=lambda: None,
    )
    curve = Trainer._final_metrics(trainer)["loss_curve"]
    stride = 3  # ceil(449 / 199): every third step, then the last one
    assert curve == [[s, round(10.0 / s, 6)] for s in range(1, 450, stride)] + [[450, round(10.0 / 450, 6)]]
    assert len(curve) == 151 <= 200


# -- server ------------------------------------------------------------------------------------


def test_server_view_shows_the_metrics_numbers(page, world):
    chat(world["url"], "sentiment", max_tokens=2)  # at least one request for the adapter
    metrics = httpx.get(world["url"] + "/metrics").text
    requests = sum(
        float(v) for v in re.findall(r'lora_kit_requests_total\{adapter="sentiment@1",[^}]*\} (\S+)', metrics)
    )
    generated = re.search(r'lora_kit_generated_tokens_total\{adapter="sentiment@1"\} (\S+)', metrics).group(1)
    page.goto(world["url"] + "/")
    page.get_by_role("tab", name="Server").click()
    row = page.locator("#server-adapters tbody tr", has=page.get_by_role("rowheader", name="sentiment@1"))
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == str(int(requests)) and cells[3] == str(int(float(generated)))
    expect(page.locator("#server-gauges")).to_contain_text(re.compile(r"Tokens/s\s*[\d.]+"))
    gauges = page.locator("#server-gauges").inner_text()
    assert re.search(r"Resident adapters\s+1 / 2 slots", gauges)
    assert "sentiment@1" in page.locator("#server-resident").inner_text()
    screenshot(page, "server")


# -- auth, no-ui, accessibility ----------------------------------------------------------------


def test_token_server_asks_for_the_token_and_then_works(page, world):
    url = world["token_url"]
    assert httpx.get(url + "/").status_code == 200  # the page itself holds no data
    assert httpx.get(url + "/v1/lora-kit/adapters").status_code == 401
    page.goto(url + "/")
    token_box = page.get_by_role("textbox", name="API token")
    token_box.wait_for()
    assert page.locator("main").is_hidden()
    screenshot(page, "auth")
    token_box.fill("wrong")
    page.get_by_role("button", name="Use token").click()
    page.get_by_text("That token was refused (401); try again.").wait_for()
    token_box.fill(TOKEN)
    page.get_by_role("button", name="Use token").click()
    page.get_by_text(f"serving {MODEL}").wait_for()
    assert page.locator("main").is_visible()
    run_compare(page, NEGATIVE_REVIEW, max_tokens=4)
    assert column(page, 2).locator("output").inner_text().strip() == "negative"
    assert page.evaluate("Object.keys(localStorage).length + Object.keys(sessionStorage).length") == 0
    page.get_by_role("tab", name="Registry").click()
    page.get_by_role("button", name="sentiment@1, aliases prod").wait_for()


def test_no_ui_serves_no_page(world):
    from lora_kit.cli import build_parser
    from lora_kit.server.config import ServerConfig

    assert ServerConfig.from_cli_args(build_parser().parse_args(["serve", "--no-ui"])).serve_ui is False
    assert ServerConfig.from_cli_args(build_parser().parse_args(["serve"])).serve_ui is True
    response = httpx.get(world["no_ui_url"] + "/")
    assert response.status_code == 404
    assert response.json()["errors"] == [{"code": 7003, "message": "No route for GET /"}]
    assert httpx.get(world["no_ui_url"] + "/v1/lora-kit/adapters").status_code == 200  # the API stays
    page = httpx.get(world["url"] + "/")
    assert page.status_code == 200 and '<script src="/ui/app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]  # nothing loads from elsewhere
    assert httpx.get(world["url"] + "/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(world["url"] + "/ui/secret.txt").status_code == 404


def test_every_control_is_labelled_and_the_page_fits_a_phone(browser, world):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    try:
        page.goto(world["url"] + "/")
        page.get_by_label("Model or adapter (column 2)").wait_for()
        unlabelled = page.evaluate(
            "[...document.querySelectorAll('input, textarea, select')]"
            ".filter(e => e.type !== 'hidden' && e.labels.length === 0).map(e => e.outerHTML)"
        )
        assert unlabelled == []
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.keyboard.press("Tab")  # the tabs are reachable and switch with the arrow keys
        page.get_by_role("tab", name="Compare").focus()
        page.keyboard.press("ArrowRight")
        assert page.get_by_role("tab", name="Registry").get_attribute("aria-selected") == "true"
        page.get_by_role("button", name="sentiment@1, aliases prod").wait_for()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        screenshot(page, "phone")
    finally:
        context.close()
