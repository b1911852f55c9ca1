"""``lora-kit adapters ...``: the registry's commands. Handlers return an exit status and raise
``RegistryError`` (printed as one line by ``lora_kit.cli``) for expected failures."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lora_kit.cli.common import print_json


def _registry() -> Any:
    from lora_kit.registry import Registry

    return Registry()


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _short_base(base: str | None) -> str:
    if not base:
        return "-"
    return base if len(base) <= 40 else "..." + base[-37:]


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry()
    versions = registry.list()
    if args.json:
        print_json([_json_row(registry, v) for v in versions])
        return 0
    if not versions:
        print("no adapters registered (add one with `lora-kit adapters add DIR --name NAME`)")
        return 0
    rows = [
        [
            v.ref,
            v.id[:8],
            _short_base(v.base_model),
            str(v.rank),
            ",".join(v.aliases) or "-",
            v.created_at[:19].replace("T", " "),
            ("! " if v.warnings else "") + (v.description[:40] or "-"),
        ]
        for v in versions
    ]
    print(_table(rows, ["REF", "ID", "BASE", "RANK", "ALIASES", "CREATED (UTC)", "DESCRIPTION"]))
    if any(v.warnings for v in versions):
        print("! = has warnings (see `lora-kit adapters show REF`)")
    return 0


def _json_row(registry: Any, v: Any) -> dict[str, Any]:
    """A version as `list --json` and `show --json` print it: its one JSON record (the export
    targets included, as /v1/models and the fine-tunes list show them)."""
    from lora_kit.registry.targets import version_json

    return version_json(registry, v)


def cmd_show(args: argparse.Namespace) -> int:
    registry = _registry()
    v = registry.resolve(args.ref)
    evals = registry.evals(v.id)
    if args.json:  # "evals" only when there are some: without, the same object as a row of `list --json`
        print_json({**_json_row(registry, v), **({"evals": [e.to_dict() for e in evals]} if evals else {})})
        return 0
    print(f"{v.ref}  (id {v.id})")
    print(f"  created      {v.created_at}")
    print(f"  base model   {v.base_model or '-'}")
    print(f"  rank/alpha   {v.rank} / {v.alpha:g}")
    print(f"  targets      {', '.join(v.target_modules)}")
    print(f"  aliases      {', '.join(v.aliases) or '-'}")
    print(f"  tags         {', '.join(v.tags) or '-'}")
    print(f"  description  {v.description or '-'}")
    for fname, meta in sorted(v.files.items()):
        print(f"  file         {fname}  {meta['size']} bytes  sha256 {meta['sha256']}")
    for w in v.warnings:
        print(f"  warning      {w}")
    for e in evals:  # every result kept, oldest first: lora-kit eval and the end of training
        print(
            f"  eval         {e.created_at[:19].replace('T', ' ')}  {e.metric} {e.score:.1%}"
            f" (95% CI {e.ci[0]:.1%}-{e.ci[1]:.1%}, n={e.n})  {e.precision}"
            f"  data {e.data_name or '-'} sha256 {e.data_sha256[:12]}"
        )
    shown = {k: val for k, val in v.lineage.items() if k != "lora_config"}
    if shown:
        print("  lineage")
        for line in json.dumps(shown, indent=2, sort_keys=True, default=str).splitlines()[1:-1]:
            print("  " + line)
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    v = _registry().register(
        args.dir, args.name, base_model=args.base, description=args.description or "", tags=args.tag or []
    )
    for w in v.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(v.ref)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    v = _registry().remove(args.ref, force=args.force)
    print(f"removed {v.ref}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    v = _registry().tag(args.ref, args.alias)
    print(f"{v.name}:{args.alias} -> {v.ref}")
    return 0


def cmd_untag(args: argparse.Namespace) -> int:
    _registry().untag(args.name, args.alias)
    print(f"removed alias {args.name}:{args.alias}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    reg = _registry()
    problems = reg.verify(args.ref)
    for p in problems:
        print(f"CORRUPT: {p}")
    if problems:
        print(f"{len(problems)} problem(s) found in {reg.root}", file=sys.stderr)
        return 1
    count = 1 if args.ref else len(reg.list())
    print(f"ok: {count} version(s) verified")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lora_kit.registry import RegistryError
    from lora_kit.registry.export import export_adapter, export_archive

    reg = _registry()
    if args.archive:
        if args.target != "peft":
            raise RegistryError("--archive writes lora-kit's own archive (PEFT files + manifest); drop --target")
        result = export_archive(reg, args.ref, args.dest)
    else:
        result = export_adapter(reg, args.ref, args.dest, target=args.target, model_type=args.model_type)
    for note in result.notes:
        print(note)
    print(result.path)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from lora_kit.registry.export import import_archive

    v = import_archive(_registry(), args.archive, name=args.name)
    print(v.ref)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lora_kit.registry.merge import merge_adapter

    result = merge_adapter(_registry(), args.ref, args.out, dtype=args.dtype, log=lambda m: print(m, file=sys.stderr))
    for note in result.notes[-1:]:
        print(note)
    print(result.path)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register the ``adapters`` command group on the top-level ``subparsers``."""
    p_ad = subparsers.add_parser(
        "adapters", help="the adapter registry: list, show, add, rm, tag, verify, export, import, merge"
    )
    sub = p_ad.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    ref_help = "NAME (latest), NAME@VERSION, NAME:ALIAS or a version id"

    p = sub.add_parser("list", help="list all adapter versions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show one adapter version with its lineage and eval results")
    p.add_argument("ref", metavar="REF", help=ref_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("add", help="validate a PEFT directory and register it as a new version")
    p.add_argument("dir", metavar="DIR", help="directory with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--name", required=True, help="adapter name: [a-z0-9][a-z0-9._-]{0,63}")
    p.add_argument(
        "--base", default=None, metavar="SPEC", help="base model (default: the config's base_model_name_or_path)"
    )
    p.add_argument("--description", default="", metavar="D")
    p.add_argument("--tag", action="append", metavar="T", help="a free-form tag (repeatable)")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("rm", help="remove a version (refused while an alias points at it, unless --force)")
    p.add_argument("ref", metavar="REF", help=ref_help)
    p.add_argument("--force", action="store_true", help="also remove the aliases pointing at it")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("tag", help="point NAME:ALIAS at a version")
    p.add_argument("ref", metavar="REF", help=ref_help)
    p.add_argument("alias", metavar="ALIAS")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("untag", help="remove the alias NAME:ALIAS")
    p.add_argument("name", metavar="NAME")
    p.add_argument("alias", metavar="ALIAS")
    p.set_defaults(func=cmd_untag)

    p = sub.add_parser("verify", help="re-hash stored files; exit 1 on corruption")
    p.add_argument("ref", nargs="?", default=None, metavar="REF", help="one version (default: all)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "export", help="write a version for PEFT, Cloudflare, vLLM or llama.cpp (GGUF), or as a .tar.gz archive"
    )
    p.add_argument("ref", metavar="REF", help=ref_help)
    p.add_argument("dest", metavar="DEST", help="new directory (or, with --archive, a .tar.gz path or a directory)")
    p.add_argument(
        "--target",
        choices=["peft", "cloudflare", "vllm", "gguf"],
        default="peft",
        help="gguf: one llama.cpp LoRA file (DEST: the .gguf path or a directory); needs the base on this machine",
    )
    p.add_argument(
        "--model-type",
        choices=["mistral", "llama", "gemma"],
        default=None,
        help="Cloudflare model_type (default: from the base model)",
    )
    p.add_argument("--archive", action="store_true", help="write a .tar.gz that `adapters import` restores bit for bit")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="register the adapter in an exported .tar.gz archive")
    p.add_argument("archive", metavar="ARCHIVE")
    p.add_argument("--name", default=None, help="register under this name (default: the archived name)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("merge", help="merge a version into its base: one model directory, no LoRA at run time")
    p.add_argument("ref", metavar="REF", help=ref_help)
    p.add_argument("out", metavar="OUT", help="new directory for the merged model (safetensors + tokenizer)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="dtype of the saved weights (default: the base's own)",
    )
    p.set_defaults(func=cmd_merge)
