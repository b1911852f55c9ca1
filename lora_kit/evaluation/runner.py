"""Run evaluation cases through the serving engine for several REFs in one pass.

Every case is rendered by :mod:`lora_kit.chat` exactly as the server renders a ``messages``
body (``add_generation_prompt``), and decoded greedily by an :class:`~lora_kit.engine.Engine`
built as ``lora-kit serve`` builds one. All requests (every case for every REF) are queued
before the decode loop starts, case by case, so each batch mixes the REFs' adapters (and the
base) as a busy server's batches do. The REF ``base`` is the base model without an adapter.

A precision names how the base model is loaded: ``fp32``/``bf16``/``fp16`` (full precision in
that dtype; ``fp32`` is exact, its dense weights never narrowed), ``bf16w`` (fp32 compute with
the dense weights held in bf16: what ``lora-kit serve`` does by default on a CPU that multiplies
bf16 natively, see ``EngineConfig.weight_dtype``), ``int8w`` (fp32 compute, dense weights in
blockwise int8: ``lora-kit serve --weight-dtype int8``) or ``nf4``/``fp4`` (4-bit bitsandbytes, in the
machine's default compute dtype, with double quantization, as ``lora-kit serve --quantization
nf4`` loads it).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_kit import chat, models
from lora_kit.engine.config import EngineConfig
from lora_kit.evaluation.cases import EvalCase
from lora_kit.evaluation.metrics import (
    EvalError,
    MetricResult,
    Score,
    check_metric,
    check_references,
    score_all,
    summarize,
)

if TYPE_CHECKING:
    from lora_kit.engine import Engine, GenerationOutput
    from lora_kit.engine.adapters import Resolver

log = logging.getLogger(__name__)

BASE_REF = "base"  # the base model without an adapter (an adapter named "base" is still base@N)
# precision -> (EngineConfig.quantization, compute dtype name (None: the machine's default),
# EngineConfig.weight_dtype)
PRECISIONS: dict[str, tuple[str, str | None, str]] = {
    "fp32": ("none", "float32", "float32"),
    "bf16w": ("none", "float32", "bfloat16"),
    "int8w": ("none", "float32", "int8"),
    "bf16": ("none", "bfloat16", "auto"),
    "fp16": ("none", "float16", "auto"),
    "nf4": ("nf4", None, "auto"),
    "fp4": ("fp4", None, "auto"),
}
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def precision_of(quantization: str, compute_dtype: Any = None) -> str:
    """The precision name of a base loaded with ``quantization`` in ``compute_dtype`` (None: the default)."""
    if quantization != "none":
        return quantization
    if compute_dtype is None:
        compute_dtype = models.default_compute_dtype()
    return _DTYPE_NAMES[str(compute_dtype).removeprefix("torch.")]


def serving_precision(model_spec: str | None = None) -> str:
    """The precision ``lora-kit serve --model model_spec`` loads the base in with no flags, on this
    machine: on a CPU fp32, or bf16 weights (``bf16w``) where the CPU multiplies bf16 natively or
    the base is too large for fp32 here (:func:`lora_kit.engine.fit.cpu_weight_dtype`)."""
    from lora_kit.engine.fit import cpu_weight_dtype

    precision = precision_of(EngineConfig().quantization)
    if precision == "fp32" and models.default_device().type == "cpu":
        numel = models.checkpoint_numel(model_spec) if model_spec else None
        dtype = cpu_weight_dtype(EngineConfig().weight_dtype, numel, models.available_memory_bytes())
        return "bf16w" if dtype == "bfloat16" else "fp32"
    return precision


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise EvalError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def load_engine(
    model_spec: str,
    precision: str,
    *,
    adapter_resolver: Resolver | None = None,
    registry_root: Path | str | None = None,
    adapters: int = 1,
    requests: int = 64,
) -> Engine:
    """An engine over ``model_spec`` loaded at ``precision``, with a slot per adapter and a queue
    that holds ``requests`` (an eval queues all its requests at once); otherwise the server's defaults."""
    import torch

    from lora_kit.engine import Engine
    from lora_kit.engine.fit import BaseFit, check_fits, half_precision_linears

    quantization, dtype, weight_dtype = PRECISIONS[check_precision(precision)]
    compute_dtype = getattr(torch, dtype) if dtype else None
    if models.default_device().type == "cpu":  # refused before loading when it cannot fit
        held = quantization if quantization != "none" else {"auto": dtype}.get(weight_dtype, weight_dtype)
        check_fits(BaseFit(held, models.checkpoint_numel(model_spec), models.available_memory_bytes()), model_spec)
    # bf16 weights under fp32 activations: a 16-bit checkpoint is read as stored, never copied to fp32
    linear_dtype = half_precision_linears(model_spec, weight_dtype) if precision in ("bf16w", "int8w") else None
    model = models.load_model(model_spec, quantization, compute_dtype=compute_dtype, linear_dtype=linear_dtype)  # type: ignore[arg-type]
    defaults = EngineConfig()
    config = EngineConfig(
        model=model_spec,
        quantization=quantization,  # type: ignore[arg-type]
        weight_dtype=weight_dtype,  # type: ignore[arg-type]
        max_slots=max(defaults.max_slots, adapters),
        max_queue=max(defaults.max_queue, requests),
    )
    tokenizer = models.load_tokenizer(model_spec)
    return Engine(
        config, model=model, tokenizer=tokenizer, adapter_resolver=adapter_resolver, registry_root=registry_root
    )


def _prompts(tokenizer: Any, cases: Sequence[EvalCase]) -> list[list[int]]:
    """The token ids of every case, rendered as the server renders a ``messages`` body."""
    out = []
    for i, case in enumerate(cases):
        try:
            out.append(chat.render(tokenizer, case.messages, add_generation_prompt=True).input_ids)
        except chat.ChatError as err:
            raise EvalError(f"example {i + 1}: {err}") from None
    return out


def generate(
    engine: Engine, refs: Sequence[str], cases: Sequence[EvalCase], max_tokens: int
) -> tuple[dict[str, str], dict[str, list[GenerationOutput]]]:
    """REF -> its canonical key, and REF -> the greedy output of every case; all REFs decoded in one pass."""
    from lora_kit.engine import GenerationRequest, InvalidRequest, SamplingParams

    keys = {ref: None if ref == BASE_REF else engine.check_adapter(ref) for ref in refs}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    queued: dict[str, list] = {ref: [] for ref in refs}
    for i, ids in enumerate(_prompts(engine.tokenizer, cases)):  # case-major: each batch mixes the REFs
        for ref in refs:
            try:
                queued[ref].append(engine.submit(GenerationRequest(list(ids), params, adapter=keys[ref])))
            except InvalidRequest as err:  # e.g. a prompt longer than the model's context
                raise EvalError(f"example {i + 1}: {err}") from None
    engine.start()
    outputs = {ref: [engine.result(seq) for seq in seqs] for ref, seqs in queued.items()}
    return {ref: key or BASE_REF for ref, key in keys.items()}, outputs


@dataclass
class RefResult:
    """One REF's answers, their scores and the metric over them; ``key``: the canonical reference."""

    ref: str
    key: str
    result: MetricResult
    answers: list[str]
    scores: list[Score]
    token_ids: list[list[int]] = field(repr=False, default_factory=list)

    def to_dict(self, answers: bool = True) -> dict[str, Any]:
        out = {"ref": self.ref, "key": self.key, **self.result.to_dict()}
        if answers:
            out["answers"] = self.answers
            out["answer_tokens"] = [len(ids) for ids in self.token_ids]  # == max_tokens: cut at the limit
        return out


@dataclass
class EvalReport:
    """The results of one pass: every REF on the same cases, model, precision and metric."""

    metric: str
    precision: str
    model: str
    max_tokens: int
    cases: list[EvalCase]
    results: list[RefResult]
    data_sha256: str | None = None
    data_name: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def result(self, ref: str) -> RefResult:
        return next(r for r in self.results if r.ref == ref)

    def differences(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Cases where the first two REFs answer differently: those scored differently first."""
        if len(self.results) < 2:
            return []
        a, b = self.results[:2]
        rows = [
            {
                "index": i,
                "reference": case.reference,
                a.ref: {"answer": a.answers[i], "correct": a.scores[i].correct},
                b.ref: {"answer": b.answers[i], "correct": b.scores[i].correct},
            }
            for i, case in enumerate(self.cases)
            if a.answers[i] != b.answers[i]
        ]
        rows.sort(key=lambda r: r[a.ref]["correct"] == r[b.ref]["correct"])  # stable: file order within
        return rows[:limit] if limit is not None else rows

    def to_dict(self, limit: int | None = 20) -> dict[str, Any]:
        """Everything but the token ids: each REF's metric and answers, and ``limit`` differences."""
        return {
            "metric": self.metric,
            "precision": self.precision,
            "model": self.model,
            "max_tokens": self.max_tokens,
            "n": len(self.cases),
            "data": self.data_name,
            "data_sha256": self.data_sha256,
            "created_at": self.created_at,
            "results": [r.to_dict() for r in self.results],
            "differences": self.differences(limit),
        }


def check_refs(refs: Sequence[str]) -> None:
    if not refs:
        raise EvalError(f"name at least one REF to evaluate (an adapter reference, or '{BASE_REF}')")
    if len(set(refs)) != len(refs):
        raise EvalError(f"a REF is named twice: {', '.join(refs)}")


def score(
    engine: Engine, refs: Sequence[str], cases: Sequence[EvalCase], metric: str, max_tokens: int
) -> list[RefResult]:
    """Generate for every REF in one pass and score each REF's answers against the references."""
    check_refs(refs)
    check_metric(metric)
    keys, outputs = generate(engine, refs, cases, max_tokens)
    references = [c.reference for c in cases]
    results = []
    for ref in refs:
        answers = [o.text for o in outputs[ref]]
        scores = score_all(metric, answers, references)
        ids = [o.token_ids for o in outputs[ref]]
        results.append(RefResult(ref, keys[ref], summarize(metric, scores), answers, scores, ids))
    return results


def evaluate(
    model_spec: str,
    refs: Sequence[str],
    cases: Sequence[EvalCase],
    *,
    metric: str = "exact_match",
    precision: str | None = None,
    max_tokens: int = 256,
    adapter_resolver: Resolver | None = None,
    registry_root: Path | str | None = None,
) -> EvalReport:
    """Load ``model_spec`` at ``precision`` (default: the server's), evaluate ``refs`` in one pass, free the engine."""
    precision = check_precision(precision or serving_precision(model_spec))
    check_refs(refs)
    check_references(metric, [c.reference for c in cases])
    n_adapters = sum(ref != BASE_REF for ref in refs)
    engine = load_engine(
        model_spec,
        precision,
        adapter_resolver=adapter_resolver,
        registry_root=registry_root,
        adapters=n_adapters,
        requests=len(refs) * len(cases),
    )
    try:
        results = score(engine, refs, cases, metric, max_tokens)
    finally:
        engine.stop()
        del engine
        release_memory()
    log.info("evaluated %s on %d examples at %s", ", ".join(refs), len(cases), precision)
    return EvalReport(metric, precision, model_spec, max_tokens, list(cases), results)


def release_memory() -> None:
    """Collect what a dropped model left, hand the heap's free blocks back to the system (glibc keeps
    them: measured at 7B, the freed NF4 training model left ~6 GB that the next base's fit check
    saw as used), and CUDA's cached blocks (a second base must fit)."""
    import torch

    from lora_kit.engine.backends.memory import trim_heap

    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def record(registry: Any, report: EvalReport, as_ref: Mapping[str, str] | None = None) -> list[Any]:
    """Store each adapter REF's result in ``registry`` (the base is no registry version); the records.

    ``as_ref``: REF -> the registry reference to record it under (the trainer evaluates its adapter
    directory before it has a version); by default a REF is recorded under its canonical key."""
    stored = []
    for r in report.results:
        if r.ref == BASE_REF:
            continue
        stored.append(
            registry.record_eval(
                (as_ref or {}).get(r.ref, r.key),
                metric=report.metric,
                score=r.result.score,
                n=r.result.n,
                ci=r.result.ci,
                data_sha256=report.data_sha256 or "",
                data_name=report.data_name,
                precision=report.precision,
                details={**r.result.to_dict(), "model": report.model, "max_tokens": report.max_tokens},
            )
        )
    return stored
