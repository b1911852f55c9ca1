"""One process vs engine replicas on Ray Serve: throughput of a mixed-adapter load, and the gateway hop.

Runs `lora-kit serve` (one process) and then `lora-kit serve --replicas N` over the same
registry (the embedded model, 8 random rank-8 adapters), one after the other, and sends each:

- **throughput**: 16 concurrent clients over HTTP, each request on one of the 8 adapters,
  greedy, exactly ``--tokens`` new tokens (``ignore_eos``); tokens/s over the whole run;
- **hop latency**: 1-token requests one at a time (base model), p50. The hop (HTTP proxy ->
  gateway -> replica and back) is measured against ONE replica holding all the CPUs, so both
  servers compute the same prefill with the same threads and the difference is the hop alone
  (N replicas of 1 CPU each also prefill on fewer threads, which is not the hop's cost).

Best of ``--rounds`` per measurement. On a 2-core machine two replicas cannot be faster than one
process (they split the same cores); the figures that matter there are the hop and that affinity
holds (the share of each adapter's requests served by its most frequent replica).

    .venv/bin/python scripts/bench_serve_scale.py [--replicas 2] [--tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "smollm2-135m-instruct"
RUN = "/client/v4/accounts/bench/ai/run/" + MODEL
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?", "Who wrote Hamlet?"]


def make_registry(home: Path, count: int) -> list[str]:
    """``count`` random rank-8 q/v adapters registered in ``home``'s registry."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_kit import models, paths
    from lora_kit.registry import Registry

    (home / "models").symlink_to(paths.models_dir())
    (home / "kernels").symlink_to(paths.kernels_dir())
    registry = Registry(home / "registry")
    base = models.load_model(MODEL)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    names = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.05)
        peft_model.save_pretrained(home / f"a{i}")
        registry.register(home / f"a{i}", f"a{i}", base_model=MODEL)
        names.append(f"a{i}")
    return names


def start_server(home: Path, replicas: int, replica_cpus: int | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "lora_kit", "serve", "--port", str(port), "--slots", "8", "--max-batch", "16"]
    if replicas:
        cpus = replica_cpus or max(1, (os.cpu_count() or 2) // replicas)
        command += ["--replicas", str(replicas), "--replica-cpus", str(cpus)]
    env = {**os.environ, "LORA_KIT_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(home / f"serve-{replicas}.log", "w+")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server did not start:\n{(home / f'serve-{replicas}.log').read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def ask(client: httpx.Client, lora: str | None, tokens: int, question: str) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": tokens, "temperature": 0}
    body |= {"ignore_eos": True} | ({"lora": lora} if lora else {})
    resp = client.post(RUN, json=body)
    resp.raise_for_status()
    return resp


def throughput(url: str, names: list[str], tokens: int, clients: int = 16) -> tuple[float, dict[str, Counter]]:
    """Tokens/s of ``clients`` concurrent requests (adapter i % 8), and who served each adapter."""
    replicas: dict[str, Counter] = {name: Counter() for name in names}
    with httpx.Client(base_url=url, timeout=600) as client:

        def one(i: int) -> int:
            lora = names[i % len(names)]
            resp = ask(client, lora, tokens, QUESTIONS[i % len(QUESTIONS)])
            replicas[lora][resp.headers.get("x-lora-kit-replica", "-")] += 1
            return resp.json()["result"]["usage"]["completion_tokens"]

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = sum(pool.map(one, range(clients * 2)))
        return done / (time.perf_counter() - start), replicas


def hop_latency(url: str, count: int = 30) -> float:
    """p50 seconds of a 1-token base request, one at a time."""
    with httpx.Client(base_url=url, timeout=60) as client:
        ask(client, None, 1, QUESTIONS[0])
        times = []
        for i in range(count):
            start = time.perf_counter()
            ask(client, None, 1, QUESTIONS[i % len(QUESTIONS)])
            times.append(time.perf_counter() - start)
    return median(times)


def measure(home: Path, replicas: int, names: list[str], tokens: int, rounds: int, cpus: int | None = None) -> dict:
    proc, url = start_server(home, replicas, cpus)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:  # warm-up: every adapter loaded once
            for name in names:
                ask(client, name, 2, QUESTIONS[0])
        best, affinity = 0.0, {}
        for _ in range(rounds):
            tps, served = throughput(url, names, tokens)
            if tps > best:
                best, affinity = tps, served
        hop = min(hop_latency(url) for _ in range(rounds))
    finally:
        stop_server(proc)
    sticky = sum(c.most_common(1)[0][1] for c in affinity.values()) / max(
        1, sum(sum(c.values()) for c in affinity.values())
    )
    return {"tps": best, "p50": hop, "sticky": sticky}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-serve-scale-"))
    try:
        names = make_registry(home, 8)
        single = measure(home, 0, names, args.tokens, args.rounds)
        scaled = measure(home, args.replicas, names, args.tokens, args.rounds)
        one = measure(home, 1, names, args.tokens, args.rounds, cpus=os.cpu_count() or 2)  # the hop alone
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"\n{os.cpu_count()} CPUs; 16 clients, 8 adapters, {args.tokens} tokens/request; best of {args.rounds}")
    print("| server | tokens/s | p50 of a 1-token request | adapter affinity |")
    print("|---|---:|---:|---:|")
    print(f"| one process | {single['tps']:.1f} | {single['p50'] * 1000:.1f} ms | - |")
    print(f"| {args.replicas} replicas on Ray Serve | {scaled['tps']:.1f} | {scaled['p50'] * 1000:.1f} ms | "
          f"{scaled['sticky']:.0%} |")  # fmt: skip
    print(f"| 1 replica with all CPUs on Ray Serve | {one['tps']:.1f} | {one['p50'] * 1000:.1f} ms | "
          f"{one['sticky']:.0%} |")  # fmt: skip
    print(f"\nthroughput: {args.replicas} replicas / one process {scaled['tps'] / single['tps']:.2f}x, "
          f"1 replica / one process {one['tps'] / single['tps']:.2f}x; the gateway hop adds "
          f"{(one['p50'] - single['p50']) * 1000:.1f} ms at p50 (same threads; goal < 10 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
