"""``lora-kit generate``: one completion through the same engine as ``lora-kit serve``."""

from __future__ import annotations

import argparse

from lora_kit.cli.common import CliError
from lora_kit.engine.config import EngineConfig

# The engine settings that matter for one completion (flags derived from EngineConfig, as serve's).
ENGINE_FLAGS = ("model", "quantization", "adapter_dtype", "weight_dtype", "kv_dtype")


def cmd_generate(args: argparse.Namespace) -> int:
    from lora_kit import chat
    from lora_kit.engine import Engine, GenerationRequest, SamplingParams, UnknownAdapter
    from lora_kit.engine.threads import dedicate_cpu_threads
    from lora_kit.registry import RegistryError

    if not 0 <= args.temperature <= 5:
        raise CliError("--temperature must be between 0 and 5")
    dedicate_cpu_threads()
    # The same engine as `lora-kit serve`: same renderer, same adapter path, same sampling.
    engine = Engine(EngineConfig.from_cli_args(args, max_slots=1))
    try:
        try:
            adapter = engine.check_adapter(args.lora) if args.lora else None
        except UnknownAdapter as err:
            # HTTP clients get the short message; the operator gets the registry's own
            # (its path, the versions there, "did you mean ...").
            if isinstance(err.__cause__, RegistryError):
                raise CliError(str(err.__cause__)) from None
            raise
        ids = chat.render_prompt(engine.tokenizer, args.prompt, raw=args.raw)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        out = engine.generate_sync(GenerationRequest(ids, params, adapter=adapter))
    finally:
        engine.stop()
    print(out.text)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``generate``."""
    p = sub.add_parser("generate", help="print one completion of PROMPT")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument(
        "--lora",
        default=None,
        metavar="REF",
        help="adapter reference from the registry (NAME, NAME@VERSION, NAME:ALIAS)",
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="send PROMPT to the tokenizer as is, without the chat template")
    EngineConfig.add_cli_args(p, only=ENGINE_FLAGS)
    p.set_defaults(func=cmd_generate)
