"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Counters and histograms are kept per label set under one lock; gauges (queue depth, running
requests, resident adapters, slots) and the prefix cache's counters and size are read from
``engine.stats()`` at scrape time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import Any, Optional

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Distinct ``adapter`` label values kept; later ones share OVERFLOW_LABEL, so a stream of new
# adapters or mixes cannot grow the series (and the scrape) without bound.
MAX_ADAPTER_LABELS = 256
OVERFLOW_LABEL = "_other"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

Labels = tuple[tuple[str, str], ...]

# The engine's prefix cache (engine.stats()["prefix_cache"]): (metric, stats key, help).
PREFIX_COUNTERS = (
    ("lora_kit_prefix_cache_lookups_total", "lookups", "Prompts looked up in the prefix cache at prefill."),
    ("lora_kit_prefix_cache_hits_total", "hits", "Prompts that reused cached prefix KV."),
    (
        "lora_kit_prefix_cache_tokens_reused_total",
        "tokens_reused",
        "Prompt tokens taken from the prefix cache, not prefilled.",
    ),
    ("lora_kit_prefix_cache_evicted_blocks_total", "evicted_blocks", "Prefix cache blocks evicted for room."),
)
PREFIX_GAUGES = (
    ("lora_kit_prefix_cache_bytes", "bytes", "Bytes of KV the prefix cache holds."),
    ("lora_kit_prefix_cache_blocks", "blocks", "Blocks the prefix cache holds."),
    ("lora_kit_prefix_cache_budget_bytes", "budget_bytes", "The prefix cache's byte budget (0: off)."),
)


def _labels(**labels: Optional[str]) -> Labels:
    return tuple(sorted((k, "" if v is None else str(v)) for k, v in labels.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    pairs = list(labels) + list(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _fmt_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


_COUNTERS = ("requests", "errors", "tokens", "prompt_tokens")  # Metrics' counter attributes
_HISTOGRAMS = ("latency", "ttft")  # Metrics' histogram attributes


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """The server's metrics. ``record_*`` are called by the routes; :meth:`render` by ``GET /metrics``."""

    def __init__(
        self,
        stats: Optional[Callable[[], dict[str, Any]]] = None,
        peers: Optional[Callable[[], Iterable[dict[str, Any]]]] = None,
    ) -> None:
        self._lock = threading.Lock()
        self._stats = stats
        self._peers = peers  # other processes' snapshots, summed into every scrape (Ray replicas)
        self.requests: dict[Labels, float] = {}
        self.errors: dict[Labels, float] = {}
        self.tokens: dict[Labels, float] = {}
        self.prompt_tokens: dict[Labels, float] = {}
        self.latency: dict[Labels, _Histogram] = {}
        self.ttft: dict[Labels, _Histogram] = {}
        self._adapters: set[str] = set()

    def _adapter(self, adapter: Optional[str]) -> str:
        """The ``adapter`` label for ``adapter`` (canonical, from the server): itself while fewer than
        :data:`MAX_ADAPTER_LABELS` are known, else :data:`OVERFLOW_LABEL`. Called under the lock."""
        if not adapter or adapter in self._adapters:
            return adapter or ""
        if len(self._adapters) >= MAX_ADAPTER_LABELS:
            return OVERFLOW_LABEL
        self._adapters.add(adapter)
        return adapter

    def record_request(self, route: str, adapter: Optional[str], status: int, seconds: float) -> None:
        """One finished inference request (any status)."""
        with self._lock:
            adapter = self._adapter(adapter)
            key = _labels(route=route, adapter=adapter, status=str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            lat_key = _labels(route=route, adapter=adapter)
            self.latency.setdefault(lat_key, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def record_error(self, route: str, code: int) -> None:
        with self._lock:
            key = _labels(route=route, code=str(code))
            self.errors[key] = self.errors.get(key, 0) + 1

    def record_first_token(self, adapter: Optional[str], seconds: float) -> None:
        with self._lock:
            key = _labels(adapter=self._adapter(adapter))
            self.ttft.setdefault(key, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def record_tokens(self, adapter: Optional[str], prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            key = _labels(adapter=self._adapter(adapter))
            self.tokens[key] = self.tokens.get(key, 0) + completion_tokens
            self.prompt_tokens[key] = self.prompt_tokens.get(key, 0) + prompt_tokens

    def snapshot(self) -> dict[str, Any]:
        """This process's counters and histograms as plain data (what another process sums in)."""
        with self._lock:
            counters = {name: dict(getattr(self, name)) for name in _COUNTERS}
            hists = {
                name: {labels: (list(h.counts), h.total, h.sum) for labels, h in getattr(self, name).items()}
                for name in _HISTOGRAMS
            }
        return {"counters": counters, "histograms": hists}

    def _summed(self) -> dict[str, Any]:
        """This process's snapshot plus every peer's."""
        total = self.snapshot()
        for peer in self._peers() if self._peers else ():
            for name, values in peer["counters"].items():
                mine = total["counters"][name]
                for labels, value in values.items():
                    mine[labels] = mine.get(labels, 0) + value
            for name, values in peer["histograms"].items():
                mine = total["histograms"][name]
                for labels, (counts, n, sum_) in values.items():
                    have = mine.get(labels, ([0] * len(counts), 0, 0.0))
                    mine[labels] = ([a + b for a, b in zip(have[0], counts)], have[1] + n, have[2] + sum_)
        return total

    def render(self) -> str:
        """All metrics as Prometheus text (this process's, plus its peers' when it has any)."""
        lines: list[str] = []

        def counter(name: str, help_: str, values: dict[Labels, float]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} counter")
            for labels, value in sorted(values.items()):
                lines.append(f"{name}{_fmt_labels(labels)} {_fmt_value(value)}")

        def histogram(name: str, help_: str, values: dict[Labels, tuple[list[int], int, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} histogram")
            for labels, (counts, total, sum_) in sorted(values.items()):
                for bound, count in zip(LATENCY_BUCKETS, counts):
                    lines.append(f"{name}_bucket{_fmt_labels(labels, [('le', _fmt_value(bound))])} {count}")
                lines.append(f"{name}_bucket{_fmt_labels(labels, [('le', '+Inf')])} {total}")
                lines.append(f"{name}_sum{_fmt_labels(labels)} {_fmt_value(sum_)}")
                lines.append(f"{name}_count{_fmt_labels(labels)} {total}")

        def gauge(name: str, help_: str, value: float) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {_fmt_value(value)}")

        summed = self._summed()
        counters, hists = summed["counters"], summed["histograms"]
        counter(
            "lora_kit_requests_total", "Inference requests by route, adapter and HTTP status.", counters["requests"]
        )
        counter("lora_kit_request_errors_total", "Failed requests by route and API error code.", counters["errors"])
        counter("lora_kit_generated_tokens_total", "Generated (completion) tokens by adapter.", counters["tokens"])
        counter("lora_kit_prompt_tokens_total", "Prompt tokens by adapter.", counters["prompt_tokens"])
        histogram("lora_kit_request_duration_seconds", "Inference request latency.", hists["latency"])
        histogram("lora_kit_time_to_first_token_seconds", "Time from request to first generated token.", hists["ttft"])
        stats = self._stats() if self._stats else {}
        gauge("lora_kit_queue_depth", "Requests waiting for a batch place.", float(stats.get("queue_depth", 0)))
        gauge("lora_kit_running_requests", "Requests being decoded now.", float(stats.get("running", 0)))
        resident = stats.get("resident_adapters", 0)
        gauge(
            "lora_kit_resident_adapters",
            "Adapters loaded in LoRA slots.",
            float(len(resident) if isinstance(resident, (list, tuple, set, dict)) else resident),
        )
        gauge("lora_kit_adapter_slots", "LoRA slots.", float(stats.get("slots", 0) or 0))
        finished = {_labels(reason=reason): float(n) for reason, n in (stats.get("finished") or {}).items()}
        counter(
            "lora_kit_engine_finished_total",
            "Requests the engine finished, by reason (cancelled: client gone).",
            finished,
        )
        prefix = stats.get("prefix_cache") or {}
        for name, key, help_ in PREFIX_COUNTERS:
            counter(name, help_, {(): float(prefix.get(key, 0))})
        for name, key, help_ in PREFIX_GAUGES:
            gauge(name, help_, float(prefix.get(key, 0)))
        return "\n".join(lines) + "\n"
