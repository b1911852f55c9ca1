"""The ``lora-kit`` command. Thin: parse arguments, call the modules, print.

Heavy modules (torch, transformers) are imported inside the handlers so that
``lora-kit --help`` starts instantly.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from lora_kit import __version__

DEFAULT_MODEL = "smollm2-135m-instruct"  # kept in sync with models.DEFAULT_MODEL without importing it


class CliError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# -- models ------------------------------------------------------------------------------------


def cmd_models_list(args: argparse.Namespace) -> int:
    from lora_kit import models

    rows = models.list_models()
    if args.json:
        _print_json(rows)
        return 0
    for row in rows:
        state = "prepared" if row["prepared"] else "not prepared"
        print(f"{row['name']:<24} {state:<13} {row['origin']}  ({row['path']})")
    print("Any local Hugging Face directory or hub id (e.g. mistralai/Mistral-7B-Instruct-v0.1) works too.")
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from lora_kit import models

    for name in args.names:
        print(models.prepare_embedded(name))
    return 0


def cmd_kernels_build(args: argparse.Namespace) -> int:
    from lora_kit.engine import bgmv

    if not bgmv.load():
        raise CliError(f"the CPU LoRA kernel cannot be built here: {bgmv.error()}")
    print(bgmv.loaded_path())
    return 0


# -- generate ----------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from lora_kit import chat
    from lora_kit.engine import Engine, GenerationRequest, SamplingParams
    from lora_kit.engine.threads import dedicate_cpu_threads

    if not 0 <= args.temperature <= 5:
        raise CliError("--temperature must be between 0 and 5")
    dedicate_cpu_threads()
    # The same engine as `lora-kit serve`: same renderer, same adapter path, same sampling.
    engine = Engine(args.model, quantization=args.quantization, max_slots=1)
    try:
        adapter = engine.check_adapter(args.lora) if args.lora else None
        ids = chat.render_prompt(engine.tokenizer, args.prompt, raw=args.raw)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        out = engine.generate_sync(GenerationRequest(ids, params, adapter=adapter))
    finally:
        engine.stop()
    print(out.text)
    return 0


# -- train / plan -------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from lora_kit import recipe as recipe_mod
    from lora_kit.train import train

    if args.resume and args.fresh:
        raise CliError("--resume and --fresh are exclusive")
    recipe = recipe_mod.load(args.recipe, args.set, name=args.name)
    if args.run_dir:
        recipe.output.run_dir = args.run_dir
    resume = True if args.resume else (False if args.fresh else None)
    result = train(recipe, resume=resume)
    if result.main_process:  # other DDP ranks print nothing
        print(result.ref or result.adapter_dir)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from lora_kit import plan
    from lora_kit import recipe as recipe_mod

    recipe = recipe_mod.load(args.recipe, args.set, name=args.name)
    report = plan.plan(recipe, device=args.device)
    if args.json:
        _print_json(report)
    else:
        print(plan.format_report(report))
    return 0


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="YAML recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--name", default=None, help="adapter name (overrides output.name)")


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-kit",
        description="Fine-tune Mistral-7B-Instruct with QLoRA, keep adapters in a registry, serve them by name.",
    )
    parser.add_argument("--version", action="version", version=f"lora-kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_models = sub.add_parser("models", help="base models: list the embedded ones, prepare (convert) them")
    msub = p_models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = msub.add_parser("list", help="list embedded models and whether they are prepared")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models_list)
    p = msub.add_parser("prepare", help="convert an embedded model into a cached safetensors directory")
    p.add_argument("names", nargs="*", default=[DEFAULT_MODEL], metavar="NAME", help=f"default: {DEFAULT_MODEL}")
    p.set_defaults(func=cmd_models_prepare)

    p_kernels = sub.add_parser("kernels", help="the engine's CPU LoRA kernel: build it now (else on first use)")
    ksub = p_kernels.add_subparsers(dest="kernels_command", metavar="ACTION", required=True)
    p = ksub.add_parser("build", help="compile the kernel for this machine into LORA_KIT_HOME/kernels; prints its path")
    p.set_defaults(func=cmd_kernels_build)

    p = sub.add_parser("train", help="train a QLoRA adapter from a recipe and register it; prints NAME@VERSION last")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint (required to exist)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    p.add_argument("--run-dir", default=None, help="run directory (default: LORA_KIT_HOME/runs/NAME-HASH)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="estimate peak memory and count tokens of a recipe, before any run")
    _add_recipe_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="plan for this device (default: this machine's)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", help="print one completion of PROMPT")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model: embedded name, local dir or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--lora", default=None, metavar="REF", help="adapter reference from the registry (NAME, NAME@VERSION, NAME:ALIAS)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="send PROMPT to the tokenizer as is, without the chat template")
    p.add_argument("--quantization", choices=["none", "nf4", "fp4"], default="none", help="load the base in 4-bit (default: none)")
    p.set_defaults(func=cmd_generate)

    from lora_kit.cli_adapters import add_adapters_parser

    add_adapters_parser(sub)
    from lora_kit.cli_serve import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except CliError as err:
        print(f"lora-kit: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # expected domain errors carry a readable message
        from lora_kit.errors import is_user_error

        if is_user_error(err):
            print(f"lora-kit: error: {err}", file=sys.stderr)
            return 2
        raise
