"""The end-of-run task evaluation: the held-out task metric (exact match, JSON fields...) of the
exported adapter, and of the base to compare, through the serving engine (:mod:`lora_kit.evaluation`)
at the server's default precision, and at the training precision when it differs.

The trainer builds one :class:`TaskEval` with the run's held-out records: ``check_data()`` refuses,
before training, replies the metric cannot score; ``run()`` measures the exported adapter.
The eval loss during training is :mod:`lora_kit.training.eval_loss`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_kit.engine.adapters import mapping_resolver
from lora_kit.evaluation.cases import EvalCase, case_of, file_sha256
from lora_kit.evaluation.metrics import EvalError, check_references
from lora_kit.evaluation.runner import BASE_REF, EvalReport, evaluate, precision_of, serving_precision
from lora_kit.training import data
from lora_kit.training.errors import TrainError
from lora_kit.training.recipe import Recipe

if TYPE_CHECKING:
    import torch

ADAPTER_REF = "adapter"  # the freshly exported adapter, by its name in the eval's mapping resolver


@dataclass
class TaskEval:
    """The task evaluation of one run: its recipe, held-out records, training dtype, run directory,
    and where its lines go (``say``: the trainer's progress log)."""

    recipe: Recipe
    records: list[dict[str, Any]]
    compute_dtype: torch.dtype
    run_dir: Path
    say: Callable[[str], None]

    @property
    def enabled(self) -> bool:
        """Whether the run measures a task metric: held-out records, a metric, and examples to use."""
        ecfg = self.recipe.eval
        return bool(self.records and ecfg.task_metric != "none" and ecfg.max_examples)

    def check_data(self) -> None:
        """Refuse, before training, held-out replies the task metric cannot score (json_fields: not JSON)."""
        if not self.enabled:
            return
        metric = self.recipe.eval.task_metric
        try:
            check_references(metric, [c.reference for c in self.cases()])
        except EvalError as err:
            raise TrainError(f"eval.task_metric {metric}: {err}") from None

    def cases(self) -> list[EvalCase]:
        """The held-out examples the task metric is measured on (the first ``eval.max_examples``)."""
        records = self.records[: self.recipe.eval.max_examples]
        return [case_of(data.to_messages(r, self.recipe.data, i), f"eval example {i}") for i, r in enumerate(records)]

    def run(self, adapter_dir: Path, run_metrics: dict[str, Any], release: Callable[[], None]) -> list[EvalReport]:
        """Measure the adapter exported to ``adapter_dir``, once per precision (serving first), into
        ``run_metrics`` and ``task_eval.json``; returns the reports (none when not :attr:`enabled`).

        ``release`` drops the training model first: each precision then loads the base afresh, as a
        server would, and frees it before the next one.
        """
        if not self.enabled:
            return []
        cases = self.cases()
        served, trained = (
            serving_precision(self.recipe.model.base),
            precision_of(self.recipe.model.quantization, self.compute_dtype),
        )
        fingerprint = self._data_fingerprint()
        release()
        reports = []
        for precision in dict.fromkeys([served, trained]):
            how = "as served" if precision == served else "as trained"
            reports.append(self._evaluate(adapter_dir, cases, precision, fingerprint, how))
        run_metrics.update(task_eval_metrics(reports, served, trained))
        answers = {r.precision: r.to_dict(limit=None) for r in reports}  # every answer, for a look afterwards
        (self.run_dir / "task_eval.json").write_text(json.dumps(answers, indent=2))
        return reports

    def _evaluate(
        self, adapter_dir: Path, cases: list[EvalCase], precision: str, fingerprint: tuple[str, str], how: str
    ) -> EvalReport:
        """One precision's report of the adapter (and the base, with ``eval.compare_base``), said as it comes."""
        ecfg = self.recipe.eval
        report = evaluate(
            self.recipe.model.base,
            [ADAPTER_REF, BASE_REF] if ecfg.compare_base else [ADAPTER_REF],
            cases,
            metric=ecfg.task_metric,
            precision=precision,
            max_tokens=ecfg.max_new_tokens,
            adapter_resolver=mapping_resolver({ADAPTER_REF: adapter_dir}),
        )
        report.data_sha256, report.data_name = fingerprint
        self._say_report(report, how)
        return report

    def _data_fingerprint(self) -> tuple[str, str]:
        """(sha256, name) of the held-out data: the eval file's bytes when it is one local file (what
        ``lora-kit eval --data FILE`` records), else the canonical JSON of the held-out records."""
        source = self.recipe.data.eval
        if isinstance(source, str) and Path(source).expanduser().is_file():
            return file_sha256(Path(source).expanduser()), source
        return data.fingerprint(self.records), "held-out split" if source is None else str(source)

    def _say_report(self, report: EvalReport, how: str) -> None:
        """The comparison line (base -> adapter) of one precision, and two sample answers."""
        adapter = report.result(ADAPTER_REF)
        header = f"held-out {report.metric.replace('_', ' ')} ({adapter.result.n} examples): "
        low, high = adapter.result.ci
        detail = f"  (95% CI {low:.1%}-{high:.1%}; {report.precision}, {how})"
        if adapter.result.field_score is not None:
            detail += f"; fields {adapter.result.field_score:.1%}"
        if len(report.results) > 1:
            base = report.result(BASE_REF)
            self.say(header + f"base {base.result.score:.1%}  ->  adapter {adapter.result.score:.1%}" + detail)
            for answer, case in list(zip(base.answers, report.cases))[:2]:
                self.say(f"  base    : {answer!r}   (expected {case.reference!r})")
        else:
            self.say(header + f"adapter {adapter.result.score:.1%}" + detail)
        for answer, case in list(zip(adapter.answers, report.cases))[:2]:
            self.say(f"  adapter : {answer!r}   (expected {case.reference!r})")


def task_eval_metrics(reports: list[EvalReport], served: str, trained: str) -> dict[str, Any]:
    """The run metrics of the task eval: ``eval_<metric>`` / ``base_<metric>`` at the serving
    precision (what users get), and ``task_eval``: every precision's results, named."""
    metric = reports[0].metric
    out: dict[str, Any] = {
        "task_eval": {
            "metric": metric,
            "n": len(reports[0].cases),
            "data": reports[0].data_name,
            "data_sha256": reports[0].data_sha256,
            "max_tokens": reports[0].max_tokens,
            "serving_precision": served,
            "training_precision": trained,
            "results": {r.precision: {res.ref: res.result.to_dict() for res in r.results} for r in reports},
        }
    }
    serving = reports[0]
    out[f"eval_{metric}"] = serving.result(ADAPTER_REF).result.score
    if len(serving.results) > 1:
        out[f"base_{metric}"] = serving.result(BASE_REF).result.score
    return out
