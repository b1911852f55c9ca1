"""The ``lora-kit serve`` command (registered by :func:`add_serve_parser`)."""

from __future__ import annotations

import argparse

from lora_kit.models import DEFAULT_MODEL


def cmd_serve(args: argparse.Namespace) -> int:
    from lora_kit.server.main import serve

    return serve(args)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lora-kit serve`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="serve the base model and registry adapters over Cloudflare Workers AI- and OpenAI-compatible HTTP APIs",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"base model: embedded name, local dir or hub id (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--api-token",
        default=None,
        metavar="T",
        help="require 'Authorization: Bearer T' on inference and management routes (default: $LORA_KIT_API_TOKEN; unset = no auth)",
    )
    p.add_argument("--slots", type=int, default=8, metavar="N", help="adapters resident at once (default: 8)")
    p.add_argument("--preload", nargs="*", default=[], metavar="REF", help="adapters to load at start")
    p.add_argument("--max-queue", type=int, default=64, metavar="N", help="waiting requests before 429 (default: 64)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests decoded together (default: 16)")
    p.add_argument(
        "--max-tokens-cap",
        type=int,
        default=4096,
        metavar="N",
        help="upper bound applied to max_tokens (default: 4096)",
    )
    p.add_argument(
        "--quantization", choices=["none", "nf4"], default="none", help="load the base in 4-bit NF4 (default: none)"
    )
    p.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_false",
        help="on the CPU, keep transformers' linear kernels instead of oneDNN-packed weights (slower; bit-exact with transformers)",
    )
    p.add_argument(
        "--no-cpu-kernel",
        dest="cpu_kernel",
        action="store_false",
        help="on the CPU, add the rows' LoRA products with torch's bmm instead of lora-kit's BGMV kernel",
    )
    p.add_argument(
        "--adapter-dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype adapters are held in (default: the model's; bfloat16 halves the bytes an adapter row reads per step, "
        "rounding its weights to bf16)",
    )
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds in-flight requests get on SIGTERM (default: 30)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    return p
