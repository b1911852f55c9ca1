"""``lora-kit models`` (embedded base models) and ``lora-kit kernels`` (the CPU LoRA kernel)."""

from __future__ import annotations

import argparse

from lora_kit.cli.common import CliError, print_json
from lora_kit.models import DEFAULT_MODEL


def cmd_models_list(args: argparse.Namespace) -> int:
    from lora_kit import models

    rows = models.list_models()
    if args.json:
        print_json(rows)
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
    from lora_kit.engine.backends import bgmv

    if not bgmv.load():
        raise CliError(f"the CPU LoRA kernel cannot be built here: {bgmv.error()}")
    print(bgmv.loaded_path())
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``models`` and ``kernels``."""
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
