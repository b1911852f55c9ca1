"""Task metrics: one score per example, summed into a proportion with its Wilson 95% interval.

- ``exact_match``: the answer equals the reference after whitespace normalization (runs of
  whitespace become one space, ends stripped);
- ``json_fields``: both sides parsed as JSON; the reference is an object whose top-level keys are
  the fields. A field is right when the answer has the key with an equal value (numbers compare
  by value, so ``1`` equals ``1.0``; ``true`` never equals ``1``). The record is right when the
  parsed objects are equal (the same keys, none extra). An answer that is not a JSON object
  counts every field wrong. Key order and spacing never matter;
- ``contains``: the normalized reference appears in the normalized answer.

The interval is Wilson's score interval for a binomial proportion (not the normal "Wald"
interval, which collapses to zero width at 0% and 100% and undercovers on small sets). For
``json_fields``' field-level share it treats fields as independent trials, which fields of one
record are not: read that interval as a lower bound of the real uncertainty.

Imports nothing heavy: the CLI builds its flags from :data:`METRICS` at start-up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lora_kit.errors import LoraKitError

METRICS = ("exact_match", "json_fields", "contains")
Z_95 = 1.959963984540054  # the standard normal quantile of 0.975


class EvalError(LoraKitError, ValueError):
    """An evaluation that cannot run as asked (data, metric, REFs); the message says what to change."""


def normalize(text: str) -> str:
    """``text`` with its whitespace runs collapsed to one space and its ends stripped."""
    return " ".join(text.strip().split())


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval of the proportion ``successes / n`` (``(0.0, 1.0)`` for ``n == 0``)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class Score:
    """One example's score: ``correct`` (the record), and for json_fields its fields right of total."""

    correct: bool
    fields_right: int = 0
    fields_total: int = 0


def same_json(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values: numbers by value, booleans only equal booleans, dicts by key set."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def parse_object(text: str) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object, or None when it is not one (invalid JSON, a list, a number)."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def score_exact_match(answer: str, reference: str) -> Score:
    return Score(normalize(answer) == normalize(reference))


def score_contains(answer: str, reference: str) -> Score:
    return Score(normalize(reference) in normalize(answer))


def score_json_fields(answer: str, reference: str) -> Score:
    """Fields of the reference object the answer gets right, and whether the whole record is right."""
    ref = parse_object(reference)
    if ref is None:
        raise EvalError(
            f"json_fields needs references that are JSON objects; this one is not: {reference[:80]!r} "
            "(use --metric exact_match or contains for text answers)"
        )
    got = parse_object(answer)
    if got is None:
        return Score(False, 0, len(ref))
    right = sum(1 for key, value in ref.items() if key in got and same_json(got[key], value))
    return Score(same_json(got, ref), right, len(ref))


_SCORERS = {"exact_match": score_exact_match, "json_fields": score_json_fields, "contains": score_contains}


def check_metric(metric: str) -> str:
    if metric not in _SCORERS:
        raise EvalError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    return metric


def check_references(metric: str, references: Sequence[str]) -> None:
    """Refuse references ``metric`` cannot score (json_fields: one that is not a JSON object) before
    any answer is generated."""
    if check_metric(metric) == "json_fields":
        for reference in references:
            score_json_fields("", reference)


def score_all(metric: str, answers: Sequence[str], references: Sequence[str]) -> list[Score]:
    """One :class:`Score` per (answer, reference) pair."""
    scorer = _SCORERS[check_metric(metric)]
    return [scorer(a, r) for a, r in zip(answers, references, strict=True)]


@dataclass(frozen=True)
class MetricResult:
    """A metric over a set of examples: ``score`` = ``correct / n`` (records), ``ci`` its 95% interval;
    for json_fields also the field-level share ``fields_right / fields_total`` and its interval."""

    metric: str
    n: int
    correct: int
    score: float
    ci: tuple[float, float]
    fields_right: int | None = None
    fields_total: int | None = None
    field_score: float | None = None
    field_ci: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric,
            "n": self.n,
            "correct": self.correct,
            "score": self.score,
            "ci95": list(self.ci),
        }
        if self.fields_total is not None:
            out.update(
                fields_right=self.fields_right,
                fields_total=self.fields_total,
                field_score=self.field_score,
                field_ci95=list(self.field_ci or ()),
            )
        return out


def summarize(metric: str, scores: Sequence[Score]) -> MetricResult:
    """The proportion of correct records (and, for json_fields, of right fields) with Wilson intervals."""
    n, correct = len(scores), sum(s.correct for s in scores)
    result = MetricResult(metric, n, correct, correct / n if n else 0.0, wilson_interval(correct, n))
    if metric != "json_fields":
        return result
    right, total = sum(s.fields_right for s in scores), sum(s.fields_total for s in scores)
    return MetricResult(
        metric,
        n,
        correct,
        result.score,
        result.ci,
        fields_right=right,
        fields_total=total,
        field_score=right / total if total else 0.0,
        field_ci=wilson_interval(right, total),
    )
