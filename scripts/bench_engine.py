"""Benchmark the multi-adapter engine against the base model, PEFT and plain transformers.

Everything runs side by side in one process on the embedded model with rank-8 all-linear
random adapters; every request generates exactly ``--tokens`` tokens (EOS ignored) so the
token counts are equal. Prints a table of tokens/s and ratios.

    LORA_KIT_HOME=/tmp/lkhome .venv/bin/python scripts/bench_engine.py --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_kit import chat, models  # noqa: E402
from lora_kit.engine import Engine, GenerationRequest, SamplingParams, mapping_resolver  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "What is the boiling point of water?", "Who wrote Hamlet?", "What is two plus two?",
    "Describe a cat in one sentence.", "What is the largest planet?", "Why is the sky blue?",
    "Translate 'hello' into Spanish.", "What is photosynthesis?", "Give me a synonym for happy.",
    "How far is the Moon?", "What language is spoken in Brazil?", "What is a prime number?",
    "Name a famous painter.",
]  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base_dir: Path, out: Path, count: int, rank: int = 8) -> dict[str, Path]:
    """``count`` random rank-``rank`` all-linear PEFT adapters: one saved by PEFT, the rest
    with the same config and keys and fresh random tensors (fast)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    first = out / "a0"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)).save_pretrained(first)
    keys = load_file(first / "adapter_model.safetensors")
    dirs = {"a0": first}
    for i in range(1, count):
        d = out / f"a{i}"
        d.mkdir(parents=True)
        shutil.copy(first / "adapter_config.json", d)
        g = torch.Generator().manual_seed(i)
        save_file({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in keys.items()}, d / "adapter_model.safetensors")
        dirs[f"a{i}"] = d
    return dirs


def timed_engine(engine: Engine, prompts: list[list[int]], adapters: list[str | None], tokens: int) -> float:
    """Seconds to finish all requests, submitted together (tokens/s = len * tokens / s)."""
    engine.stop()
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    seqs = [engine.submit(GenerationRequest(p, params, adapter=a)) for p, a in zip(prompts, adapters)]
    start = time.perf_counter()
    engine.start()
    outs = [engine.result(s) for s in seqs]
    took = time.perf_counter() - start
    assert all(o.completion_tokens == tokens for o in outs)
    return took


def padded(tokenizer, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def timed_generate(model, tokenizer, prompts: list[list[int]], tokens: int, **kwargs) -> float:
    batch = padded(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad, **kwargs)
    took = time.perf_counter() - start
    assert out.shape[1] - batch["input_ids"].shape[1] == tokens
    return took


def best(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (< 3 min on a 2-core CPU)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per request (default 64, quick 16)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement, best kept (default 3, quick 1)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    tokens = args.tokens or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.manual_seed(0)

    base_dir = Path(models.resolve(args.model))
    tokenizer = models.load_tokenizer(args.model)
    prompts = [chat.render_prompt(tokenizer, q) for q in QUESTIONS]
    p8, p32 = prompts[:8], (prompts * 2)[:32]
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    rows: list[tuple[str, float, str, float, str]] = []
    try:
        dirs = make_adapters(base_dir, tmp, 33)
        names = [f"a{i}" for i in range(32)]
        engine = Engine(args.model, model=models.load_model(args.model), tokenizer=tokenizer, max_slots=40, max_batch=32,
                        adapter_resolver=mapping_resolver(dirs))  # fmt: skip
        for n in names:
            engine.check_adapter(n)
        timed_engine(engine, p8, names[:8], 2)  # warm-up

        # 1. 8 requests, 8 adapters vs the same requests on the base
        t_mixed = best(lambda: timed_engine(engine, p8, names[:8], tokens), repeats)
        t_base = best(lambda: timed_engine(engine, p8, [None] * 8, tokens), repeats)
        tps = lambda n, t: n * tokens / t  # noqa: E731
        rows.append(("8 req / 8 adapters vs base only (lora-kit)", tps(8, t_mixed), "base only", tps(8, t_base), ">= 0.95"))

        # 2. vs PEFT adapter_names on the same mixed batch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), dirs["a0"], adapter_name="a0")
        for n in names[1:8]:
            peft_model.load_adapter(dirs[n], adapter_name=n)
        peft_model.eval()
        t_peft = best(lambda: timed_generate(peft_model, tokenizer, p8, tokens, adapter_names=names[:8]), repeats)
        rows.append(("8 req / 8 adapters: lora-kit vs PEFT adapter_names", tps(8, t_mixed), "PEFT mixed batch", tps(8, t_peft), ">= 2.5"))
        del peft_model

        # 3. 32 requests over 1, 8, 32 adapters
        t32 = {k: best(lambda k=k: timed_engine(engine, p32, [names[i % k] for i in range(32)], tokens), repeats) for k in (1, 8, 32)}
        rows.append(("32 req / 8 adapters vs 1 adapter", tps(32, t32[8]), "1 adapter", tps(32, t32[1]), ""))
        rows.append(("32 req / 32 adapters vs 1 adapter", tps(32, t32[32]), "1 adapter", tps(32, t32[1]), ">= 0.9"))

        # 4. base only: lora-kit vs plain transformers generate
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        t_hf = best(lambda: timed_generate(plain, tokenizer, p8, tokens), repeats)
        rows.append(("8 req base only: lora-kit vs transformers generate", tps(8, t_base), "HF generate", tps(8, t_hf), ">= 1.0"))

        # 5. cold adapter load (safetensors -> validated -> slot), ms
        start = time.perf_counter()
        engine.check_adapter("a32")
        cold_ms = (time.perf_counter() - start) * 1000
        engine.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmodel {args.model}, fp32 {engine.device}, {torch.get_num_threads()} threads, {tokens} tokens/request, best of {repeats}")
    print(f"{'measurement':52} {'lora-kit tok/s':>14} {'baseline':>18} {'tok/s':>8} {'ratio':>6} {'goal':>7}")
    results = []
    for label, ours, base_label, base, goal in rows:
        print(f"{label:52} {ours:14.1f} {base_label:>18} {base:8.1f} {ours / base:6.2f} {goal:>7}")
        results.append({"measurement": label, "lora_kit_tps": ours, "baseline": base_label, "baseline_tps": base, "ratio": ours / base, "goal": goal})
    print(f"{'cold adapter load (rank 8, all-linear, disk -> slot)':52} {cold_ms:11.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"tokens": tokens, "repeats": repeats, "rows": results, "cold_load_ms": cold_ms}, indent=2))


if __name__ == "__main__":
    main()
