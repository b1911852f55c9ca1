"""Benchmark prefix caching: the same engine with the cache off, cold (empty) and warm, one after the other.

Workloads, on the embedded model with 4 random rank-8 all-linear adapters, every request
generating exactly ``--tokens`` tokens (EOS ignored):

- **shared**: 8 requests submitted together, 2 per adapter, each with the same ~1,000-token
  system prompt and its own ~30-token question. Off: every row prefills its whole prompt. Cold:
  an empty cache; rows of one adapter arriving together compute the system prompt once (the
  first row goes first). Warm: the system prompt was cached by earlier requests (other questions).
- **chat**: one conversation of 4 turns on one adapter (the same system prompt; each reply is
  what the model generated, up to ``--tokens``, ending at its EOS as a real reply does, so the
  chat template renders it back as the ids it was); time to first token of turns 2-4, whose earlier turns were
  prompts already.
- **distinct**: 8 requests whose prompts share nothing (~300 tokens each): what the cache costs
  when it never hits (lookups, and copying every full block in).

Prints time to first token (p50 over the requests) and end-to-end tokens/s, best of ``--rounds``
rounds, and the ratios against the cache off. Every round uses new questions (a question's own
blocks never hit).

    .venv/bin/python scripts/bench_prefix_cache.py [--rounds 3] [--tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

from _harness import QUESTIONS, cpu_summary, random_adapters, weight_summary

from lora_kit import models
from lora_kit.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, mapping_resolver

MODEL = "smollm2-135m-instruct"
ADAPTERS = ["a0", "a1", "a2", "a3"]


def system_prompt(tokenizer, tokens: int) -> str:
    """A rule book of about ``tokens`` tokens."""
    lines: list[str] = []
    while len(tokenizer.encode("\n".join(lines))) < tokens:
        n = len(lines) + 1
        lines.append(f"Rule {n}: when a customer asks about item {n * 7}, answer politely and mention aisle {n % 12}.")
    return "\n".join(lines)


def question(round_: int, i: int) -> str:
    """About 30 tokens; differs from every other round's and row's from its first words."""
    return f"Customer {round_}-{i} asks: {QUESTIONS[i % len(QUESTIONS)]} Please answer in two short sentences, citing a rule."


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def run(engine: Engine, prompts: list[list[int]], adapters: list[str | None], tokens: int, exact: bool = True) -> dict:
    """Submit all, start the loop; time to each request's first token, and the whole batch's wall
    time. ``exact``: exactly ``tokens`` each (EOS ignored), else up to ``tokens``, ending at EOS."""
    engine.stop()
    params = SamplingParams(max_tokens=tokens, ignore_eos=exact)
    seqs = [engine.submit(GenerationRequest(p, params, adapter=a)) for p, a in zip(prompts, adapters)]
    first: list[float] = [0.0] * len(seqs)
    outs: list = [None] * len(seqs)

    def consume(i: int) -> None:
        ids: list[int] = []
        while True:
            item = seqs[i].events.get()
            if isinstance(item, BaseException):
                raise item
            if not first[i] and item.token_ids:
                first[i] = time.perf_counter() - start
            ids.extend(item.token_ids)
            if item.finished:
                outs[i] = ids
                return

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(seqs))]
    start = time.perf_counter()
    engine.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    engine.stop()
    assert all(o is not None and (len(o) == tokens or not exact) for o in outs), "a request did not finish"
    return {"ttft_p50": median(first), "tok_s": sum(len(o) for o in outs) / wall, "wall": wall, "outputs": outs}


def shared(engine: Engine, system: str, round_: int, mode: str, tokens: int) -> dict:
    tok = engine.tokenizer
    adapters = [ADAPTERS[i // 2] for i in range(8)]
    prompts = [
        chat_ids(tok, [{"role": "system", "content": system}, {"role": "user", "content": question(round_, i)}])
        for i in range(8)
    ]
    engine.prefix_cache.clear()
    if mode == "warm":  # earlier traffic: other questions under the same system prompt and adapters
        warm = [
            chat_ids(
                tok, [{"role": "system", "content": system}, {"role": "user", "content": question(-1 - round_, i)}]
            )
            for i in range(4)
        ]
        run(engine, warm, ADAPTERS, 1)
    return run(engine, prompts, adapters, tokens)


def chat(engine: Engine, system: str, round_: int, tokens: int) -> dict:
    tok = engine.tokenizer
    engine.prefix_cache.clear()
    history = [{"role": "system", "content": system}]
    ttfts = []
    for turn in range(4):
        history.append({"role": "user", "content": question(round_, turn)})
        out = run(engine, [chat_ids(tok, history)], [ADAPTERS[0]], tokens, exact=False)  # replies end at EOS
        history.append({"role": "assistant", "content": tok.decode(out["outputs"][0], skip_special_tokens=True)})
        if turn:
            ttfts.append(out["ttft_p50"])
    return {"ttft_p50": median(ttfts), "tok_s": 0.0}


def distinct(engine: Engine, round_: int, tokens: int) -> dict:
    tok = engine.tokenizer
    engine.prefix_cache.clear()
    prompts = [
        chat_ids(
            tok, [{"role": "user", "content": f"{i} {round_} " + system_prompt(tok, 300).replace("Rule", f"Note {i}")}]
        )
        for i in range(8)
    ]
    return run(engine, prompts, [ADAPTERS[i // 2] for i in range(8)], tokens)


def measure(engines: dict[str, Engine], system: str, rounds: int, tokens: int) -> dict[str, dict[str, dict]]:
    """Best of ``rounds`` for every (workload, arm): the lowest TTFT and the highest tokens/s."""
    best: dict[str, dict[str, dict]] = {}

    def keep(workload: str, arm: str, result: dict) -> None:
        cur = best.setdefault(workload, {}).get(arm)
        if cur is None:
            best[workload][arm] = {"ttft_p50": result["ttft_p50"], "tok_s": result["tok_s"]}
        else:
            cur["ttft_p50"] = min(cur["ttft_p50"], result["ttft_p50"])
            cur["tok_s"] = max(cur["tok_s"], result["tok_s"])

    for engine in engines.values():  # oneDNN's first calls of each shape, the adapters' loads: not timed
        shared(engine, system, -100, "warm", 2)
        distinct(engine, -100, 2)
    for r in range(rounds):
        keep("shared", "off", shared(engines["off"], system, r, "off", tokens))
        keep("shared", "cold", shared(engines["on"], system, r, "cold", tokens))
        keep("shared", "warm", shared(engines["on"], system, r, "warm", tokens))
        keep("chat", "off", chat(engines["off"], system, r, tokens))
        keep("chat", "warm", chat(engines["on"], system, r, tokens))
        keep("distinct", "off", distinct(engines["off"], r, tokens))
        keep("distinct", "on", distinct(engines["on"], r, tokens))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--engine-arg", action="append", default=[], help="EngineConfig field=value for both engines")
    args = parser.parse_args()

    settings = dict(kv.split("=", 1) for kv in args.engine_arg)
    work = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    try:
        adapters = random_adapters(Path(models.resolve(MODEL)), work / "adapters", ADAPTERS)
        engines = {
            arm: Engine(
                EngineConfig(MODEL, prefix_cache_mib=mib, **settings),  # type: ignore[arg-type]
                adapter_resolver=mapping_resolver(adapters),
            )
            for arm, mib in (("off", 0), ("on", 1024))
        }
        system = system_prompt(engines["on"].tokenizer, args.system_tokens)
        print(f"# CPU: {cpu_summary()}")
        print(f"# base weights: {weight_summary(engines['on'].model)}; threads {engines['on'].threads}")
        print(f"# system prompt {len(engines['on'].tokenizer.encode(system))} tokens; {args.tokens} new tokens each")
        best = measure(engines, system, args.rounds, args.tokens)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("| workload | arm | TTFT p50 (s) | tokens/s | TTFT off / arm | tokens/s arm / off |")
    print("|---|---|---:|---:|---:|---:|")
    for workload, arms in best.items():
        off = arms["off"]
        for arm, r in arms.items():
            speed = f"{r['tok_s']:.1f}" if r["tok_s"] else "-"
            ratio = f"{r['tok_s'] / off['tok_s']:.2f}x" if off["tok_s"] else "-"
            print(
                f"| {workload} | {arm} | {r['ttft_p50']:.3f} | {speed} | {off['ttft_p50'] / r['ttft_p50']:.2f}x | {ratio} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "results": best}, indent=2))


if __name__ == "__main__":
    main()
