"""One process vs engine replicas on Ray Serve: throughput of a mixed-adapter load, and Ray's hop.

Runs `lora-kit serve` (one process) and then `lora-kit serve --replicas N` over the same
registry (the embedded model, 8 random rank-8 adapters), one after the other, and sends each:

- **throughput**: 16 concurrent clients over HTTP, each request on one of the 8 adapters,
  greedy, exactly ``--tokens`` new tokens (``ignore_eos``); tokens/s over the whole run;
- **hop latency**: 1-token requests one at a time, p50, on the base model and on an adapter. The
  hop (Ray's HTTP proxy -> the replica serving the app, and back) is measured against ONE replica
  holding all the CPUs, so both servers compute the same prefill with the same threads and the
  difference is the hop alone (N replicas of 1 CPU each also prefill on fewer threads, which is
  not the hop's cost).

On the Ray servers every adapter measurement runs twice: without the routing header (as stock
SDKs send; a replica lacking the adapter relays it to one holding it) and with
``serve_multiplexed_model_id`` (Ray's proxy routes on it: one hop).

Best of ``--rounds`` per measurement. On a 2-core machine two replicas cannot be faster than one
process (they split the same cores); the figures that matter there are the hop and that affinity
holds (the share of each adapter's requests served by its most frequent replica).

    .venv/bin/python scripts/bench_serve_scale.py [--replicas 2] [--tokens 64] [--rounds 2] \
        [--ray-arg=--stream-interval-ms=0] [--no-scaled]

``--ray-arg`` passes a flag to the Ray servers only (e.g. the replicas' stream batching, on by
default); ``--no-scaled`` measures one process and the 1-replica server only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import httpx
from _harness import Serve, cpu_summary, free_port, random_adapters, share_models_and_kernels

MODEL = "smollm2-135m-instruct"
RUN = "/client/v4/accounts/bench/ai/run/" + MODEL
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?", "Who wrote Hamlet?"]


def make_registry(home: Path, count: int) -> list[str]:
    """``count`` random rank-8 q/v adapters registered in ``home``'s registry."""
    from lora_kit import models
    from lora_kit.registry import Registry

    share_models_and_kernels(home)
    registry = Registry(home / "registry")
    names = [f"a{i}" for i in range(count)]
    dirs = random_adapters(
        Path(models.resolve(MODEL)), home / "adapters", names, targets=["q_proj", "v_proj"], std=0.05
    )
    for name, adapter_dir in dirs.items():
        registry.register(adapter_dir, name, base_model=MODEL)
    return names


def start_server(home: Path, replicas: int, replica_cpus: int | None = None, extra: list[str] | None = None) -> Serve:
    """`lora-kit serve` on ``home`` (one process, or ``replicas`` engine replicas on Ray Serve, with
    the ``extra`` flags), ready."""
    command = ["--slots", "8", "--max-batch", "16"]
    port = 0
    if replicas:
        cpus = replica_cpus or max(1, (os.cpu_count() or 2) // replicas)
        command += ["--replicas", str(replicas), "--replica-cpus", str(cpus), *(extra or [])]
        port = free_port()  # Ray Serve's proxy is told its port; it cannot pick one and say which
    env = {"LORA_KIT_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    return Serve(command, env=env, log=home / f"serve-{replicas}.log", port=port, grace=120).start()


def routing(lora: str | None, header: bool) -> dict[str, str]:
    """The routing header for ``lora`` (when asked for and there is an adapter)."""
    return {"serve_multiplexed_model_id": lora} if header and lora else {}


def ask(client: httpx.Client, lora: str | None, tokens: int, question: str, header: bool = False) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": tokens, "temperature": 0}
    body |= {"ignore_eos": True} | ({"lora": lora} if lora else {})
    resp = client.post(RUN, json=body, headers=routing(lora, header))
    resp.raise_for_status()
    return resp


def throughput(
    url: str, names: list[str], tokens: int, clients: int = 16, header: bool = False
) -> tuple[float, dict[str, Counter]]:
    """Tokens/s of ``clients`` concurrent requests (adapter i % 8), and who served each adapter."""
    replicas: dict[str, Counter] = {name: Counter() for name in names}
    with httpx.Client(base_url=url, timeout=600) as client:

        def one(i: int) -> int:
            lora = names[i % len(names)]
            resp = ask(client, lora, tokens, QUESTIONS[i % len(QUESTIONS)], header)
            replicas[lora][resp.headers.get("x-lora-kit-replica", "-")] += 1
            return resp.json()["result"]["usage"]["completion_tokens"]

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = sum(pool.map(one, range(clients * 2)))
        return done / (time.perf_counter() - start), replicas


def streamed(url: str, names: list[str], tokens: int, clients: int = 16, header: bool = False) -> dict:
    """``clients`` concurrent streamed requests (SSE, adapter i % 8): tokens/s, time to the first
    text event (p50) and SSE events per request (fewer than tokens when a replica batches its stream)."""
    with httpx.Client(base_url=url, timeout=600) as client:

        def one(i: int) -> tuple[float, int]:
            body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": tokens}
            lora = names[i % len(names)]
            body |= {"temperature": 0, "ignore_eos": True, "stream": True, "lora": lora}
            start, first, events = time.perf_counter(), 0.0, 0
            with client.stream("POST", RUN, json=body, headers=routing(lora, header)) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith("data: ") and '"response"' in line and '"response":""' not in line:
                        events += 1
                        first = first or time.perf_counter() - start
            return first, events

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(clients * 2)))
        took = time.perf_counter() - start
    return {
        "tps": len(results) * tokens / took,
        "ttft": median(r[0] for r in results),
        "events": median(r[1] for r in results),
    }


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every process's CPU seconds so far (user + system), with a label naming what it is: Ray
    workers by their title (``ray::ServeReplica:lora-kit:EngineReplica``), daemons by their program."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (_label(int(entry.name), cmd), (int(fields[11]) + int(fields[12])) / ticks)
    return out


def _label(pid: int, cmd: str) -> str:
    if pid == os.getpid():
        return "this benchmark (16 HTTP clients)"
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    if "lora_kit" in cmd and " serve" in cmd:
        return "lora-kit serve (one process, or Ray's driver)"
    program = Path(cmd.split()[0]).name if cmd else "?"
    module = next((part for part in cmd.split() if part.endswith(".py")), "")
    return f"{program} {Path(module).name}".strip()


def cpu_shares(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall: float) -> dict:
    """Cores each kind of process used between two :func:`process_cpu` snapshots (above 0.005)."""
    used: Counter = Counter()
    for pid, (label, cpu) in after.items():
        used[label] += cpu - before.get(pid, (label, 0.0))[1]
    return {label: cores / wall for label, cores in used.most_common() if cores / wall > 0.005}


def hop_latency(url: str, count: int = 30, lora: str | None = None, header: bool = False) -> float:
    """p50 seconds of a 1-token request (base, or on ``lora``), one at a time."""
    with httpx.Client(base_url=url, timeout=60) as client:
        ask(client, lora, 1, QUESTIONS[0], header)
        times = []
        for i in range(count):
            start = time.perf_counter()
            ask(client, lora, 1, QUESTIONS[i % len(QUESTIONS)], header)
            times.append(time.perf_counter() - start)
    return median(times)


def measure(
    home: Path, replicas: int, names: list[str], tokens: int, rounds: int, cpus: int | None = None, extra=None
) -> dict:
    """One server's figures: per routing variant (no header; with it, on Ray), tokens/s, 1-token p50
    on an adapter, affinity, streamed figures and each process's cores; the base model's p50."""
    server = start_server(home, replicas, cpus, extra)
    url = server.url
    out: dict = {"variants": {}}
    try:
        with httpx.Client(base_url=url, timeout=600) as client:  # warm-up: every adapter loaded once
            for name in names:
                ask(client, name, 2, QUESTIONS[0])
        for header in (False, True) if replicas else (False,):
            best, affinity, cpu = 0.0, {}, {}
            for _ in range(rounds):
                before, start = process_cpu(), time.perf_counter()
                tps, served = throughput(url, names, tokens, header=header)
                shares = cpu_shares(before, process_cpu(), time.perf_counter() - start)
                if tps > best:
                    best, affinity, cpu = tps, served, shares
            sticky = sum(c.most_common(1)[0][1] for c in affinity.values()) / max(
                1, sum(sum(c.values()) for c in affinity.values())
            )
            out["variants"]["header" if header else "no header"] = {
                "tps": best,
                "sticky": sticky,
                "cpu": cpu,
                "p50": min(hop_latency(url, lora=names[0], header=header) for _ in range(rounds)),
                "sse": max(
                    (streamed(url, names, tokens, header=header) for _ in range(rounds)), key=lambda r: r["tps"]
                ),
            }
        out["p50_base"] = min(hop_latency(url) for _ in range(rounds))
    finally:
        server.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--ray-arg", action="append", default=[], help="extra flag for the Ray servers (repeatable; --ray-arg=--flag=v)"
    )
    ap.add_argument(
        "--no-scaled", action="store_true", help="skip the --replicas N server (one process and 1 replica only)"
    )
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-serve-scale-"))
    extra = [part for arg in args.ray_arg for part in arg.split("=", 1)]
    try:
        names = make_registry(home, 8)
        single = measure(home, 0, names, args.tokens, args.rounds)
        scaled = None if args.no_scaled else measure(home, args.replicas, names, args.tokens, args.rounds, extra=extra)
        one = measure(home, 1, names, args.tokens, args.rounds, os.cpu_count() or 2, extra)  # the hop alone
    finally:
        shutil.rmtree(home, ignore_errors=True)
    report(args, extra, single, scaled, one)


def report(args: argparse.Namespace, extra: list[str], single: dict, scaled: dict | None, one: dict) -> None:
    base = single["variants"]["no header"]
    servers = [
        ("one process", single),
        (f"{args.replicas} replicas on Ray Serve", scaled),
        ("1 replica with all CPUs on Ray Serve", one),
    ]
    print(f"\nCPU: {cpu_summary()}; 16 clients, 8 adapters, {args.tokens} tokens/request; best of {args.rounds}")
    print(f"Ray servers' extra flags: {' '.join(extra) or 'none'}")
    print(
        "| server | routing header | tokens/s (x one process) | 1-token p50, adapter | 1-token p50, base | adapter affinity |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for label, res in servers:
        for variant, v in (res or {"variants": {}})["variants"].items():
            print(f"| {label} | {variant if res is not single else '-'} | {v['tps']:.1f} ({v['tps'] / base['tps']:.2f}x) | "
                  f"{v['p50'] * 1000:.1f} ms | {res['p50_base'] * 1000:.1f} ms | {v['sticky']:.0%} |")  # fmt: skip
    print(f"\nstreamed (SSE), 16 clients: tokens/s, TTFT p50, text events per {args.tokens}-token request")
    for label, res in servers:
        for variant, v in (res or {"variants": {}})["variants"].items():
            sse = v["sse"]
            print(f"| {label} | {variant if res is not single else '-'} | {sse['tps']:.1f} | {sse['ttft'] * 1000:.0f} ms | {sse['events']:.0f} |")  # fmt: skip
    print("\nCPU cores used by each kind of process during the best 16-client round")
    for label, res in (("one process", single), ("1 replica", one)):
        for variant, v in res["variants"].items():
            print(f"- {label}, {variant}: " + "; ".join(f"{name} {cores:.2f}" for name, cores in v["cpu"].items()))
    hop = {variant: (v["p50"] - base["p50"]) * 1000 for variant, v in one["variants"].items()}
    print(f"\nRay's hop at p50 (1 replica with the same threads as one process; goal < 10 ms): base "
          f"{(one['p50_base'] - single['p50_base']) * 1000:+.1f} ms, adapter "
          + ", ".join(f"{variant} {ms:+.1f} ms" for variant, ms in hop.items()))  # fmt: skip


if __name__ == "__main__":
    main()
