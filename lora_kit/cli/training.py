"""``lora-kit train`` and ``lora-kit plan``: recipes in, adapters (or a memory plan) out."""

from __future__ import annotations

import argparse

from lora_kit.cli.common import CliError, print_json


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe. Progress goes to the ``lora_kit.training`` loggers, which ``lora_kit.logs``
    (set up by ``cli.main``) shows on stderr; stdout gets one line, NAME@VERSION (or the adapter
    directory when the recipe does not register it), so scripts can read it."""
    from lora_kit.training import recipe as recipe_mod
    from lora_kit.training.trainer import train

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
    from lora_kit.training import plan
    from lora_kit.training import recipe as recipe_mod

    recipe = recipe_mod.load(args.recipe, args.set, name=args.name)
    report = plan.plan(recipe, device=args.device, strategy=args.strategy, world_size=args.world_size)
    if args.json:
        print_json(report)
    else:
        print(plan.format_report(report))
    return 0


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="YAML recipe")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key (repeatable)"
    )
    p.add_argument("--name", default=None, help="adapter name (overrides output.name)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``plan``."""
    p = sub.add_parser("train", help="train a QLoRA adapter from a recipe and register it; prints NAME@VERSION last")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint (required to exist)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    p.add_argument("--run-dir", default=None, help="run directory (default: LORA_KIT_HOME/runs/NAME-HASH)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="estimate peak memory and count tokens of a recipe, before any run")
    _add_recipe_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="plan for this device (default: this machine's)"
    )
    p.add_argument("--world-size", type=int, default=1, help="processes (GPUs) to plan for; memory is per rank")
    p.add_argument(
        "--strategy",
        choices=["none", "ddp", "fsdp"],
        default=None,
        help="how the processes share the work (default: the recipe's train.distributed, else ddp for several)",
    )
    p.set_defaults(func=cmd_plan)
