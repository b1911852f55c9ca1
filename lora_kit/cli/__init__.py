"""The ``lora-kit`` command. Thin: parse arguments, call the library, print.

One module per command group (``models``, ``training``, ``generate``, ``adapters``, ``eval``, ``serve``),
each registering its parsers. Heavy modules (torch, transformers) are imported inside the
handlers so that ``lora-kit --help`` starts instantly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lora_kit import __version__, logs
from lora_kit.cli import adapters, generate, models, serve, training
from lora_kit.cli import eval as eval_cmd
from lora_kit.cli.common import CliError
from lora_kit.errors import is_user_error

__all__ = ["CliError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-kit",
        description="Fine-tune Mistral-7B-Instruct with QLoRA, keep adapters in a registry, serve them by name.",
    )
    parser.add_argument("--version", action="version", version=f"lora-kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models.add_parsers(sub)
    training.add_parsers(sub)
    generate.add_parser(sub)
    adapters.add_parser(sub)
    eval_cmd.add_parser(sub)
    serve.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure()
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except Exception as err:
        if is_user_error(err):  # expected: its message says what to do
            print(f"lora-kit: error: {err}", file=sys.stderr)
            return 2
        raise
