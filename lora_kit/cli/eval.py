"""``lora-kit eval REF [REF ...] --data FILE``: score adapter versions (and the base) on held-out data
through the serving engine, in one pass, and keep each adapter's result in the registry."""

from __future__ import annotations

import argparse
from typing import Any

from lora_kit.cli.common import CliError, print_json
from lora_kit.evaluation.metrics import METRICS
from lora_kit.evaluation.runner import BASE_REF, PRECISIONS

SHOWN_CHARS = 100  # an answer longer than this is cut in the differences list


def _base_model(registry: Any, refs: list[str], model: str | None) -> str:
    """``--model``, else the base the adapters were registered with (one for all), else the default."""
    from lora_kit.models import DEFAULT_MODEL

    bases = {ref: registry.resolve(ref).base_model for ref in refs if ref != BASE_REF}
    if model:
        return model
    found = sorted({b for b in bases.values() if b})
    if len(found) > 1:
        listed = ", ".join(f"{ref} on {base}" for ref, base in bases.items())
        raise CliError(f"the adapters were trained on different base models ({listed}); evaluate them separately")
    return found[0] if found else DEFAULT_MODEL


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None else f"{ci[0]:.1%}-{ci[1]:.1%}"


def _cut(text: str) -> str:
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


def print_report(report: Any, show: int) -> None:
    """The table (one row per REF) and the first ``show`` cases where the first two REFs differ."""
    sha = (report.data_sha256 or "")[:12]
    print(
        f"{report.metric} on {len(report.cases)} examples of {report.data_name} (sha256 {sha}), "
        f"base {report.model} at {report.precision}, greedy, max {report.max_tokens} tokens"
    )
    header = ["REF", "SCORE", "95% CI", "CORRECT"]
    fields = report.metric == "json_fields"
    if fields:
        header += ["FIELDS", "FIELDS 95% CI"]
    rows = []
    for r in report.results:
        m = r.result
        row = [r.key, _pct(m.score), _ci(m.ci), f"{m.correct}/{m.n}"]
        if fields:
            row += [_pct(m.field_score), _ci(m.field_ci)]
        rows.append(row)
    print(_table(rows, header))
    if len(report.results) < 2:
        return
    diffs = report.differences()
    a, b = (r.ref for r in report.results[:2])
    print(f"\n{len(diffs)} example(s) where {a} and {b} answer differently" + (":" if diffs and show else ""))
    for d in diffs[:show]:
        print(f"  #{d['index'] + 1}  expected {_cut(d['reference'])}")
        for ref in (a, b):
            mark = "right" if d[ref]["correct"] else "wrong"
            print(f"      {ref} ({mark}): {_cut(d[ref]['answer'])}")


def cmd_eval(args: argparse.Namespace) -> int:
    from lora_kit.engine.threads import dedicate_cpu_threads
    from lora_kit.evaluation import cases as cases_mod
    from lora_kit.evaluation import runner
    from lora_kit.registry import Registry

    if args.max_examples is not None and args.max_examples < 1:
        raise CliError("--max-examples must be >= 1")
    if args.max_tokens < 1:
        raise CliError("--max-tokens must be >= 1")
    registry = Registry()
    model = _base_model(registry, args.refs, args.model)  # also: every REF names a version, before loading
    cases = cases_mod.load_cases(args.data, args.max_examples)
    dedicate_cpu_threads()
    report = runner.evaluate(
        model,
        args.refs,
        cases,
        metric=args.metric,
        precision=args.precision,
        max_tokens=args.max_tokens,
        registry_root=registry.root,
    )
    report.data_sha256, report.data_name = cases_mod.file_sha256(args.data), str(args.data)
    runner.record(registry, report)
    if args.json:
        print_json(report.to_dict(limit=args.show))
    else:
        print_report(report, args.show)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval``."""
    p = sub.add_parser(
        "eval",
        help="score adapter versions (and the base) on held-out data, as the server answers",
        description="Runs every example through the serving engine (the server's chat rendering, greedy "
        "decoding, mixed-adapter batches) for every REF in one pass; prints each REF's score with its "
        "95% (Wilson) interval and the examples where the first two REFs differ. Each adapter's result "
        "is kept in the registry (`lora-kit adapters show REF`).",
    )
    p.add_argument(
        "refs", nargs="+", metavar="REF", help=f"NAME, NAME@VERSION, NAME:ALIAS, or '{BASE_REF}' (no adapter)"
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="JSONL in the training chat format; each line's last assistant message is the reference answer",
    )
    p.add_argument("--metric", choices=METRICS, default="exact_match", help="(default: exact_match)")
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default=None,
        help="how the base is loaded (default: as `lora-kit serve` loads it: on a CPU fp32, or bf16 weights "
        "(bf16w) where the CPU multiplies bf16 natively or fp32 would take over half the free memory; bf16 on CUDA)",
    )
    p.add_argument("--max-examples", type=int, default=None, metavar="N", help="the first N examples only")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="answer length limit (default: 256)")
    p.add_argument("--model", default=None, help="base model (default: the one the adapters were registered with)")
    p.add_argument("--show", type=int, default=5, metavar="N", help="differing examples to print (default: 5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_eval)
