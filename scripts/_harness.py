"""What the scripts share: `lora-kit serve` started and waited for, random PEFT adapters, the
tiny random Mistral with its word-level tokenizer, and the CPU a figure was measured on.

One definition of each, for every script in ``scripts/`` and for ``tests/helpers.py`` (which
takes its model and adapter builders from here: scripts never import ``tests/``). Only the
standard library is imported at the top, so ``gpu_check.py``'s no-CUDA exit stays light;
torch, PEFT, transformers, httpx and lora_kit are imported by the functions that use them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # lora_kit from this checkout, whatever the working directory
    sys.path.insert(0, str(ROOT))

# The Whitespace pre-tokenizer's specials of the tiny Mistral's word-level vocabulary.
SPECIALS = ["<unk>", "<s>", "</s>"]


def linear_targets() -> list[str]:
    """The projections an all-linear LoRA targets: the recipe's ``LINEAR_TARGETS`` (one list)."""
    from lora_kit.training.recipe import LINEAR_TARGETS

    return list(LINEAR_TARGETS)


# -- the machine ---------------------------------------------------------------------------------

CPU_FLAGS = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]


def cpu_summary() -> str:
    """``MODEL NAME, N CPUs, flags: avx2 avx512f ...`` (the flags that decide 16-bit speed; "none of"
    them when none), from /proc/cpuinfo through the engine's own reader of the CPU flags."""
    from lora_kit.engine.backends.bgmv import cpu_flags

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    present = set(cpu_flags().partition(":")[2].split())
    flags = " ".join(f for f in CPU_FLAGS if f in present) or f"none of {' '.join(CPU_FLAGS)}"
    return f"{name}, {os.cpu_count()} CPUs, flags: {flags}"


# -- lora-kit serve --------------------------------------------------------------------------------

URL_LINE = re.compile(r"on (http://[\w.\[\]:-]+:\d+)")


class ServeError(RuntimeError):
    """`lora-kit serve` did not come up; the message ends with the tail of its output."""


class Serve:
    """`lora-kit serve ARGS --host 127.0.0.1 --port PORT` in a process group of its own.

    A thread reads its output (stdout and stderr together) line by line, so the pipe never fills:
    each line is kept in ``lines`` and written to ``log``; with ``echo`` the lines printed before
    the server is ready are printed here too, indented. With ``port`` 0 (the default) the server
    picks a free port and ``url`` is taken from its start-up line (``--replicas`` needs a real
    port: pass :func:`free_port`). Ready once ``/healthz`` answers 200. ``stop()`` (or leaving the
    ``with`` block): SIGTERM, a graceful stop, then SIGKILL to the whole group after ``grace`` s.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        echo: bool = False,
        timeout: float = 600,
        grace: float = 60,
        port: int = 0,
    ) -> None:
        self.command = [sys.executable, "-m", "lora_kit", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
        self.env, self.log, self.echo, self.timeout, self.grace = env, log, echo, timeout, grace
        self.lines: list[str] = []
        self.url: str | None = f"http://127.0.0.1:{port}" if port else None
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self._found = threading.Event()
        if port:
            self._found.set()

    def start(self) -> Serve:
        """Start the server and wait until it answers ``/healthz``; :class:`ServeError` if it does not
        within ``timeout`` seconds (the server is stopped then)."""
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, env={**os.environ, **(self.env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        out = open(self.log, "w") if self.log else None  # noqa: SIM115 - closed by the reader thread
        threading.Thread(target=self._read, args=(out,), daemon=True).start()
        try:
            self._wait_ready(time.monotonic() + self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _read(self, out: TextIO | None) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.lines.append(line)
                if out is not None:
                    out.write(line)
                    out.flush()
                if self.echo and not self.ready:
                    print("  " + line.rstrip(), flush=True)
                found = URL_LINE.search(line)
                if found and self.url is None:
                    self.url = found.group(1)
                    self._found.set()
        finally:
            self._found.set()  # the server exited: no URL will come
            if out is not None:
                out.close()

    def _wait_ready(self, deadline: float) -> None:
        import httpx

        assert self.proc is not None
        self._found.wait(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and self.proc.poll() is None and self.url is not None:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    self.ready = True
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        state = f"exited with code {self.proc.returncode}" if self.proc.poll() is not None else "timed out"
        raise ServeError(f"`lora-kit serve` did not come up ({state}):\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "".join(self.lines[-lines:]).rstrip() or "(no output)"

    def stop(self) -> None:
        """SIGTERM to the server (a graceful stop), then SIGKILL to its whole group after ``grace`` s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers that cannot be told to pick their own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def share_models_and_kernels(home: Path) -> None:
    """A separate ``LORA_KIT_HOME`` (its own registry) that uses the real home's converted models and
    compiled kernels through symlinks, so nothing is converted or compiled twice."""
    from lora_kit import paths

    home.mkdir(parents=True, exist_ok=True)
    for sub in ("models", "kernels"):
        real = paths.home() / sub
        real.mkdir(parents=True, exist_ok=True)
        if not (home / sub).exists():
            (home / sub).symlink_to(real, target_is_directory=True)


# -- the engine benchmarks ------------------------------------------------------------------------

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "What is the boiling point of water?", "Who wrote Hamlet?", "What is two plus two?",
    "Describe a cat in one sentence.", "What is the largest planet?", "Why is the sky blue?",
    "Translate 'hello' into Spanish.", "What is photosynthesis?", "Give me a synonym for happy.",
    "How far is the Moon?", "What language is spoken in Brazil?", "What is a prime number?",
    "Name a famous painter.",
]  # fmt: skip


def timed_engine(engine: Any, prompts: list[list[int]], adapters: list[Any], tokens: int) -> float:
    """Seconds for ``engine`` to finish one request per prompt (``adapters[i]`` for prompt i: a
    name, a mix or None), all submitted before its loop starts; exactly ``tokens`` each (EOS ignored)."""
    from lora_kit.engine import GenerationRequest, SamplingParams

    engine.stop()
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    seqs = [engine.submit(GenerationRequest(p, params, adapter=a)) for p, a in zip(prompts, adapters)]
    start = time.perf_counter()
    engine.start()
    outs = [engine.result(s) for s in seqs]
    took = time.perf_counter() - start
    engine.stop()  # its loop thread ends, and with it the thread's OpenMP pool
    assert all(o.completion_tokens == tokens for o in outs)
    return took


def weight_summary(model: Any) -> str:
    """The base's linear weights as the engine really holds them after loading, e.g.
    ``bfloat16 oneDNN-packed x211`` or ``float32 x210, float32 oneDNN-packed x1``: read from the
    model's modules, not from the flag that asked for them."""
    from collections import Counter

    import torch

    from lora_kit.engine.backends.packed_linear import PackedLinear

    kinds: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            kinds[f"{str(module.weight.dtype).removeprefix('torch.')} {module.layout}"] += 1
        elif isinstance(module, torch.nn.Linear):
            kinds[
                f"{str(module.weight.dtype).removeprefix('torch.')} {type(module).__name__}".replace(" Linear", "")
            ] += 1
    return ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common()) or "no linear layers"


# -- random adapters -------------------------------------------------------------------------------


def random_adapters(
    base_dir: Path,
    out: Path,
    names: Iterable[str],
    *,
    rank: int = 8,
    alpha: int | None = None,
    targets: Sequence[str] | None = None,
    std: float = 0.02,
    seed: int = 0,
    **lora_kwargs: Any,
) -> dict[str, Path]:
    """Random PEFT LoRA adapters on ``base_dir``, one per name in ``out/NAME``: rank ``rank``,
    alpha ``alpha`` (default ``2 * rank``), on ``targets`` (default: all linear projections),
    other ``LoraConfig`` fields from ``lora_kwargs``. Every A and B is drawn from N(0, std^2)
    (B non-zero, so each adapter changes the outputs; a larger ``std`` changes them more) by a
    generator seeded ``seed + i`` for the i-th name. The base loads once, in bf16: PEFT keeps the
    LoRA weights fp32 over it and they are drawn, not derived from the base, so the adapters are the
    same as over an fp32 base (checked), and a Mistral-7B base takes 14.5 GB instead of 29."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        target_modules=list(targets or linear_targets()),
        **lora_kwargs,
    )
    peft_model = get_peft_model(base, config)
    dirs: dict[str, Path] = {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * std)
        dirs[name] = Path(out) / name
        peft_model.save_pretrained(dirs[name])
    return dirs


def random_adapter(base_dir: Path, out: Path, *, seed: int = 0, **settings: Any) -> Path:
    """One random adapter saved in ``out`` itself (``settings``: those of :func:`random_adapters`)."""
    out = Path(out)
    made = random_adapters(base_dir, out.parent, [out.name], seed=seed, **settings)
    return made[out.name]


# -- the tiny random Mistral -----------------------------------------------------------------------


def make_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level tokenizer over the words of ``texts``: <unk>=0, <s>=1, </s>=2, no chat template.

    Words are split by the Whitespace pre-tokenizer (``\\w+|[^\\w\\s]+``), so token ids
    can be written down by hand in exact-value tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in [*texts, "[INST] [/INST]"]:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(words - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False
    )


def make_tiny_mistral(path: Path, tokenizer: Any, seed: int = 0, **overrides: Any) -> Path:
    """Save a randomly initialised MistralForCausalLM (GQA, sliding window) and its tokenizer to ``path``."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "sliding_window": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    config = MistralConfig(**{**settings, **overrides})  # an override replaces a default (hidden_size=256)
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def sentiment_texts() -> list[str]:
    """Every message of the sentiment demo data (train and eval): a vocabulary that covers it."""
    import json

    return [
        message["content"]
        for split in ("train", "eval")
        for line in (ROOT / "data" / "sentiment" / f"{split}.jsonl").read_text().splitlines()
        for message in json.loads(line)["messages"]
    ]


def make_sentiment_mistral(path: Path) -> Path:
    """The tiny random Mistral whose word-level vocabulary covers the sentiment data (the smoke
    recipe's base in the tests and in gpu_check)."""
    return make_tiny_mistral(path, make_tokenizer(sentiment_texts()))
