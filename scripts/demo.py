"""`make demo`: the main job end to end on the embedded default model.

1. train a demo adapter from a recipe (4-bit QLoRA on the CPU) and register it
   (skipped when the registry already holds an adapter trained from this exact recipe);
2. start `lora-kit serve` on 127.0.0.1;
3. send the seed's Cloudflare-style request with and without `lora`, plus one through
   the official `cloudflare` SDK, and print the answers side by side;
4. stop the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
from _harness import ROOT, Serve, ServeError

RECIPE = ROOT / "recipes" / "demo-sentiment.yaml"
MODEL = "smollm2-135m-instruct"
ACCOUNT = "demo-account"
REVIEWS = [
    "The suitcase arrived with a broken wheel and the seller never answered my emails.",
    "This kettle boils water in a minute and looks lovely on the counter.",
    "Honestly, the microwave is the best thing I bought all year.",
]


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def trained_adapter() -> str:
    """NAME@VERSION of the demo adapter: reuse one trained from this exact recipe, else train."""
    from lora_kit.registry import AdapterNotFound, Registry
    from lora_kit.training import recipe as recipe_mod

    recipe = recipe_mod.load(RECIPE)
    try:
        version = Registry().resolve(recipe.output.name)
        if version.lineage.get("recipe_hash") == recipe.content_hash():
            banner(
                f"adapter {version.ref} already trained from {RECIPE.name} (delete it with `lora-kit adapters rm` to retrain)"
            )
            metrics = version.lineage.get("metrics", {})
            if "base_exact_match" in metrics:
                print(
                    f"held-out exact match: base {metrics['base_exact_match']:.1%} -> adapter {metrics['eval_exact_match']:.1%}"
                )
            return version.ref
    except AdapterNotFound:
        pass
    banner(f"lora-kit train {RECIPE.relative_to(ROOT)}")
    proc = subprocess.run(
        [sys.executable, "-m", "lora_kit", "train", str(RECIPE)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    print(proc.stdout, end="")
    if proc.returncode != 0:
        sys.exit(f"training failed (exit {proc.returncode})")
    return proc.stdout.strip().splitlines()[-1]


def start_server() -> Serve:
    banner("lora-kit serve --host 127.0.0.1 --port 0")
    try:
        return Serve([], echo=True, timeout=300).start()
    except ServeError as err:
        sys.exit(str(err))


def run_request(url: str, body: dict) -> str:
    r = httpx.post(
        f"{url}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}",
        json=body,
        timeout=120,
        headers={"Authorization": "Bearer demo-token"},
    )
    payload = r.json()
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {payload['errors']}"
    return str(payload["result"]["response"]).strip()


def main() -> int:
    os.chdir(ROOT)
    ref = trained_adapter()
    name = ref.split("@")[0]
    server = start_server()
    url = server.url
    try:
        banner('Cloudflare Workers AI requests (same body with and without "lora")')
        print(
            f"curl {url}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL} \\\n"
            f"  -H 'Authorization: Bearer $TOKEN' -H 'Content-Type: application/json' \\\n"
            f'  -d \'{{"messages": [{{"role": "user", "content": "Classify the sentiment of this review: ..."}}], "lora": "{name}"}}\'\n'
        )
        print(f"{'review':<60} | {'base model':<40} | lora={name}")
        print("-" * 130)
        for review in REVIEWS:
            body = {
                "messages": [{"role": "user", "content": f"Classify the sentiment of this review: {review}"}],
                "max_tokens": 24,
                "temperature": 0,
            }
            base = run_request(url, body)
            tuned = run_request(url, {**body, "lora": name})
            short = (review[:57] + "...") if len(review) > 60 else review
            print(f"{short:<60} | {base[:40].replace(chr(10), ' '):<40} | {tuned}")

        banner("an unknown adapter is an error, never a silent fall-back")
        print(run_request(url, {"prompt": "hi", "lora": "no-such-adapter"}))

        banner("the official cloudflare SDK, pointed at this server by base_url alone")
        from cloudflare import Cloudflare

        client = Cloudflare(api_token="demo-token", base_url=f"{url}/client/v4")
        review = "After a month, the headphones stopped working. Returning it."
        result = client.ai.run(
            MODEL,
            account_id=ACCOUNT,
            lora=name,
            max_tokens=8,
            temperature=0,
            messages=[{"role": "user", "content": f"Classify the sentiment of this review: {review}"}],
        )
        print(f"client.ai.run({MODEL!r}, lora={name!r}, ...) -> {json.dumps(result)}")
    finally:
        banner("stopping the server (SIGTERM)")
        server.stop()
        print(f"server exited with {server.proc.returncode}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
