"""The engine facade: one base model, adapter slots, and the continuous-batching loop.

:class:`Engine` loads the model (or takes one), wraps its linear layers for batched LoRA,
prepares them for its backend, and wires the pieces of the decode loop together: the
scheduler (admission), the runner (forwards, sampling, the model lock) and the output stage
(text events). Its methods are what the server and the CLI use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lora_kit import chat
from lora_kit.engine.adapters import Resolver, load_adapter, registry_resolver, resolve_adapter
from lora_kit.engine.backends import Backend, backend_choice, select_backend
from lora_kit.engine.config import EngineConfig
from lora_kit.engine.constraints import GrammarCache
from lora_kit.engine.fit import base_fit, half_precision_linears
from lora_kit.engine.loop import EngineLoop
from lora_kit.engine.lora_layer import LoraContext, wrap_linear_layers
from lora_kit.engine.output import OutputProcessor
from lora_kit.engine.prefix_cache import PrefixCache
from lora_kit.engine.runner import ModelRunner
from lora_kit.engine.sampling import RequestSampler
from lora_kit.engine.scheduler import Scheduler
from lora_kit.engine.sequence import AdapterUse, Sequence
from lora_kit.engine.slots import SlotManager
from lora_kit.engine.threads import engine_threads, run_in_thread
from lora_kit.engine.types import (
    AdapterSpec,
    EngineError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequest,
    ResolvedAdapter,
    ShuttingDown,
    adapter_mix,
    single_ref,
)
from lora_kit.widening import lookup_dtype

logger = logging.getLogger(__name__)

ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Engine:
    """Serve many LoRA adapters from one base model, every request with its own adapter.

    ``config``: the user settings (:class:`~lora_kit.engine.config.EngineConfig`; default: all
    defaults). Injected, not settings: ``model``/``tokenizer`` pre-loaded (the engine takes the
    model over: it wraps its linear layers in place; ``config.model`` then only names it);
    ``adapter_resolver(ref) -> (canonical key, adapter dir)`` finds adapters, by default in the
    lora-kit registry at ``registry_root``; ``backend`` (``"cpu"`` or ``"torch"``) overrides the
    backend chosen by platform (:mod:`lora_kit.engine.backends`), for tests and benchmarks that
    compare both in one process.

    ``config.adapter_dtype`` ``"bfloat16"`` on an fp32 CPU model halves the bytes every adapter
    row reads per step (the kernel widens them to fp32 as it reads); each A/B weight is then
    rounded to bf16 (~3 significant digits), so outputs differ slightly from PEFT's fp32 adapters.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        adapter_resolver: Resolver | None = None,
        registry_root: Path | str | None = None,
        backend: str | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.threads = config.threads or engine_threads()
        model, tokenizer = self._load(config, model, tokenizer, backend)
        self.model, self.tokenizer = model, tokenizer
        self.model_name = config.model
        self.max_slots, self.max_rank = config.max_slots, config.max_rank
        embedding = model.get_input_embeddings()
        # LoRA weights live in the compute dtype (what the embeddings' lookups return; they are never
        # 4-bit) on the model's device.
        self.device: torch.device = embedding.weight.device
        self.dtype: torch.dtype = lookup_dtype(embedding)
        self.adapter_dtype = ADAPTER_DTYPES[config.adapter_dtype] if config.adapter_dtype else self.dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.stop_ids = chat.stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        self._resolver = adapter_resolver or registry_resolver(registry_root)
        self._expected_files: dict[str, Any] = {}  # adapter key -> {file: {"sha256", "size"}} from its resolver
        self.backend: Backend = select_backend(
            self.device, self.dtype, self.adapter_dtype, self.max_rank, backend, self._weight_dtype
        )
        if config.adapter_dtype is None and self.backend.weight_dtype in (torch.bfloat16, torch.int8):
            # The base's weights are rounded to bf16 already: the adapters' are too, halving the
            # bytes each adapter row reads per step (the kernel widens them to fp32 as it reads).
            self.adapter_dtype = torch.bfloat16
        self.kv_dtype = self._kv_dtype(config.kv_dtype)
        self._wrap_layers()
        self._build_loop()
        self._thread: threading.Thread | None = None
        self._shutting_down = False  # set for good by stop(shutting_down=True)
        self._preload(config.preload)

    def _kv_dtype(self, choice: str) -> torch.dtype:
        """What the KV cache holds keys and values in: ``choice``, or for ``auto`` bf16 where the base's
        weights are bf16 (a model at bf16's precision already: its products round their inputs to
        bf16, and all but the tiled ones their outputs too), else the compute dtype (exact)."""
        if choice != "auto":
            return ADAPTER_DTYPES[choice]
        if self.device.type == "cpu" and self.backend.weight_dtype == torch.bfloat16:
            return torch.bfloat16
        return self.dtype

    def _wrap_layers(self) -> None:
        """Wrap the base's linear layers for batched LoRA, then let the backend prepare them."""
        self._ctx = LoraContext()
        self._ctx.kernel = self.backend.lora_kernel
        self._ctx.mix_kernel = self.backend.lora_mix_kernel
        self._layers = wrap_linear_layers(self.model, self._ctx)
        hint = max(8, min(self.config.max_batch, 32))  # the batch size packed layouts are tuned for
        layers = self._layers.values()
        self.packed_layers = run_in_thread(lambda: self.backend.prepare(self.model, layers, hint), self.threads)
        self._base_shapes = {name: (layer.in_features, layer.out_features) for name, layer in self._layers.items()}

    def _build_loop(self) -> None:
        """The decode loop's pieces: the slots and the runner, the scheduler, the output stage."""
        self._grammar: GrammarCache | None = None
        self._grammar_lock = threading.Lock()
        self.prefix_cache = PrefixCache(self._prefix_budget())
        slots = SlotManager(
            self._layers, self._ctx, self.max_slots, self._load_adapter, on_evict=self.prefix_cache.drop_adapter
        )
        self._runner = ModelRunner(
            self.model, self._ctx, slots, self._grammar_cache, self.device, self.prefix_cache, self.kv_dtype
        )
        self._scheduler = Scheduler(
            self._runner.can_acquire,
            self._runner.acquire_slot,
            self._runner.release_slot,
            self.device,
            self.config.max_batch,
            self.config.max_queue,
            self.kv_dtype,
        )
        output = OutputProcessor(self.tokenizer, self.stop_ids, self.max_length)
        self._loop = EngineLoop(self._scheduler, self._runner, output, self.threads)

    def _prefix_budget(self) -> int:
        """Bytes the prefix cache may hold: ``config.prefix_cache_mib``, at most a quarter of the
        memory available now (the model loaded) on the CPU, so it never crowds out the batch's KV."""
        from lora_kit import models

        budget = max(0, self.config.prefix_cache_mib) << 20
        available = models.available_memory_bytes() if self.device.type == "cpu" else None
        if budget and available is not None and budget > available // 4:
            logger.info("prefix cache: %d MiB (a quarter of the memory available)", available // 4 >> 20)
            budget = available // 4
        return budget

    def _load(self, config: EngineConfig, model: Any, tokenizer: Any, backend: str | None) -> tuple[Any, Any]:
        """The model and tokenizer: as given, else loaded from ``config.model``, its weights held as
        :func:`~lora_kit.engine.fit.base_fit` decides on the CPU (checked to fit before loading)."""
        from lora_kit import models

        self._weight_dtype = config.weight_dtype
        if model is None:
            linear_dtype = None
            if models.default_device().type == "cpu" and backend_choice(models.default_device(), backend) == "cpu":
                fit = base_fit(config.model, config.quantization, config.weight_dtype)
                if config.quantization == "none":
                    self._weight_dtype = fit.weight_dtype
                    linear_dtype = half_precision_linears(config.model, fit.weight_dtype)
            model = run_in_thread(
                lambda: models.load_model(config.model, config.quantization, linear_dtype=linear_dtype), self.threads
            )
        if tokenizer is None:
            tokenizer = models.load_tokenizer(config.model)
        model.eval()
        return model, tokenizer

    def _preload(self, refs: tuple[str, ...]) -> None:
        if len(refs) > self.max_slots:
            raise EngineError(f"cannot preload {len(refs)} adapters into {self.max_slots} slots")
        for ref in refs:
            self._runner.pin_adapter(*self.resolve(ref))

    @property
    def cpu_kernel(self) -> bool:
        """Whether the LoRA rows are added by the CPU BGMV kernel (else by torch's products)."""
        return self.backend.lora_kernel is not None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the decode loop in a background thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._scheduler.resume()
        self._thread = threading.Thread(target=self._loop.run, name="lora-kit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0, *, shutting_down: bool = False) -> None:
        """Cancel every request in flight or waiting, and join the decode loop.

        ``shutting_down``: stop for good (a server's SIGTERM). Every request whose client still
        listens ends with :class:`ShuttingDown` instead of a "cancelled" finish, and every later
        submission raises it; the engine does not start again.
        """
        if shutting_down:
            self._shutting_down = True  # before the stop: a submission from now on hears ShuttingDown
            self._loop.stop_error = ShuttingDown
        self._scheduler.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)  # the loop cancels what is left as it ends
            self._thread = None
        else:
            self._loop.cancel_all()
        if not self._shutting_down:
            self._scheduler.resume()  # stopped, not closed: new requests may queue for the next start()

    def loop_failed(self) -> bool:
        """Whether the decode loop was started and has died (a health check restarts such a replica)."""
        return self._thread is not None and not self._thread.is_alive()

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- adapters ------------------------------------------------------------------------

    def _load_adapter(self, key: str, path: Path) -> Any:
        files = self._expected_files.get(key)  # the registry's sha256 of each file (None: not checked)
        return load_adapter(key, path, self._base_shapes, self.adapter_dtype, self.device, self.max_rank, files)

    def resolve(self, ref: str) -> ResolvedAdapter:
        """What ``ref`` names: its canonical key, its directory and the file hashes the registry
        recorded (checked when it loads). Raises UnknownAdapter, InvalidAdapterReference or AdapterError.

        A caller that resolves once (a server, off its event loop) passes the answer on, in
        :meth:`check_adapter` and in a request's ``resolved_adapters``: nothing is looked up again."""
        return self._known(resolve_adapter(self._resolver, ref))

    def _known(self, resolved: ResolvedAdapter) -> ResolvedAdapter:
        if resolved.files is not None:  # the hashes the loader checks the directory against
            self._expected_files[resolved.key] = resolved.files
        return resolved

    def _resolved(self, ref: str, given: Mapping[str, ResolvedAdapter] | None) -> ResolvedAdapter:
        found = given.get(ref) if given else None
        return self._known(found) if found is not None else self.resolve(ref)

    def check_adapter(self, ref: str | ResolvedAdapter) -> str:
        """Resolve ``ref`` (unless it is resolved already) and load it into a slot now; returns the
        canonical reference.

        Raises UnknownAdapter or AdapterError, so a server can answer 4xx before streaming.
        When every slot is busy the adapter is loaded and checked, and takes a slot later.
        A load runs on a short-lived thread of its own (:func:`~lora_kit.engine.threads.run_in_thread`):
        torch work on the caller's long-lived thread (a server's worker) would leave an OpenMP pool
        behind it that slows every later decode step (one request: 15 against 32 tok/s).
        """
        resolved = self._known(ref) if isinstance(ref, ResolvedAdapter) else self.resolve(ref)
        if resolved.key not in self._runner.resident():
            run_in_thread(lambda: self._runner.check_adapter(*resolved), self.threads)
        else:  # resident: a bookkeeping touch, no torch work
            self._runner.check_adapter(*resolved)
        return resolved.key

    def validate_adapter(self, path: Path | str, name: str) -> None:
        """Check that the adapter directory ``path`` can be served here (format, modules, shapes,
        rank) without taking a slot or registering it; AdapterError names it ``name``, never ``path``.
        On a short-lived thread, as :meth:`check_adapter`'s loads."""
        shapes, dtype, rank = self._base_shapes, self.adapter_dtype, self.max_rank
        run_in_thread(lambda: load_adapter(name, Path(path), shapes, dtype, torch.device("cpu"), rank), self.threads)

    def drop_adapter(self, key: str) -> bool:
        """Free the slot of resident adapter ``key`` (canonical, as :meth:`check_adapter` returns
        it): at once when idle, else when its running requests finish; they finish with it.
        False when it is not resident. A later request for it loads it again."""
        return self._runner.drop_adapter(key)

    # -- generation ----------------------------------------------------------------------

    def _grammar_cache(self) -> GrammarCache:
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarCache(self.tokenizer, self.vocab_size, sorted(self.stop_ids))
            return self._grammar

    def _sequence(self, request: GenerationRequest) -> Sequence:
        request.params.validate()
        ids = request.prompt_ids
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.max_length:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; the model's context is {self.max_length}")
        adapters = self._adapter_uses(request.adapter, request.resolved_adapters)
        constraint = None
        if request.response_format or request.tools:
            constraint = self._grammar_cache().constraint(request.response_format, request.tools, request.tool_choice)
        sampler = RequestSampler(request.params, ids, self.vocab_size, self.device)
        return Sequence(request=request, adapters=adapters, sampler=sampler, constraint=constraint)

    def _adapter_uses(
        self, spec: AdapterSpec, given: Mapping[str, ResolvedAdapter] | None = None
    ) -> tuple[AdapterUse, ...]:
        """The adapters a request names: none, one, or a weighted mix (checked by :func:`adapter_mix`;
        the same adapter named twice counts once, with the weights added); ``given``: those resolved already."""
        if spec is None or spec == "":
            return ()
        ref = single_ref(spec)
        if ref is not None:
            return (AdapterUse(*self._resolved(ref, given)),)
        mix = adapter_mix(spec)  # type: ignore[arg-type]
        weights: dict[str, float] = {}
        paths: dict[str, Path] = {}
        for entry in mix:
            key, paths[key] = self._resolved(entry.ref, given)
            weights[key] = weights.get(key, 0.0) + entry.scale
        if len(weights) > self.max_slots:
            raise InvalidRequest(f"the mix names {len(weights)} adapters; this server holds {self.max_slots} at once")
        return tuple(AdapterUse(key, paths[key], weight) for key, weight in weights.items())

    def submit(self, request: GenerationRequest) -> Sequence:
        """Validate and queue a request without starting the loop; read it with
        :meth:`stream` or :meth:`result`. Raises InvalidRequest, UnknownAdapter, Overloaded or
        ShuttingDown now.

        A request with ``response_format`` or ``tools`` may block while its grammar compiles (up to
        the time budget of :mod:`lora_kit.engine.constraints`, then GrammarError): an async caller
        submits from a worker thread."""
        if self._shutting_down:
            raise ShuttingDown()
        seq = self._sequence(request)
        try:
            self._scheduler.submit(seq)
        except EngineError:
            if self._shutting_down:  # the stop came in between: the same answer as above
                raise ShuttingDown() from None
            raise
        return seq

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream a request's events. Errors known up front (Overloaded, UnknownAdapter,
        InvalidRequest) raise at this call; AdapterError raises from the first iteration.
        Closing or cancelling the iterator removes the request from the batch at the next step."""
        seq = self.submit(request)
        self.start()
        return self.stream(seq)

    async def stream(self, seq: Sequence) -> AsyncIterator[GenerationOutput]:
        """The events of a submitted request, as an async iterator."""
        seq.loop, seq.wakeup = asyncio.get_running_loop(), asyncio.Event()
        finished = False
        try:
            while True:
                try:
                    item = seq.events.get_nowait()
                except queue.Empty:
                    seq.wakeup.clear()
                    if seq.events.empty():  # checked after clear(): a push in between still wakes us
                        await seq.wakeup.wait()
                    continue
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                seq.cancelled = True
                self._scheduler.wake()

    def generate_sync(self, request: GenerationRequest) -> GenerationOutput:
        """Run a request to completion; the aggregated output (full text, all token ids)."""
        seq = self.submit(request)
        self.start()
        return self.result(seq)

    @staticmethod
    def result(seq: Sequence) -> GenerationOutput:
        """Block until a submitted request finishes; its aggregated output."""
        text: list[str] = []
        ids: list[int] = []
        while True:
            item = seq.events.get()
            if isinstance(item, BaseException):
                raise item
            text.append(item.text)
            ids.extend(item.token_ids)
            if item.finished:
                return GenerationOutput(
                    text="".join(text),
                    token_ids=ids,
                    finished=True,
                    finish_reason=item.finish_reason,
                    prompt_tokens=item.prompt_tokens,
                    completion_tokens=item.completion_tokens,
                    tool_calls=item.tool_calls,
                )

    @contextlib.contextmanager
    def recording_logits(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        """While inside, record the logits every generated token is drawn from:
        ``{request_id: [(V,) fp32 CPU tensor per token]}``, as the model gave them (before any
        grammar mask, penalty or temperature). The supported way to compare the engine's logits
        with a reference's (the parity tests, scripts/gpu_check.py); only copies are taken, the
        computation is untouched. V is the model's (possibly padded) vocabulary.
        """
        seen: dict[str, list[torch.Tensor]] = {}

        def keep(logits: torch.Tensor, rows: list[Sequence]) -> None:
            for i, row in enumerate(rows):
                seen.setdefault(row.request_id, []).append(logits[i].detach().float().cpu().clone())

        runner = self._runner
        runner.logits_observers = (*runner.logits_observers, keep)
        try:
            yield seen
        finally:
            runner.logits_observers = tuple(o for o in runner.logits_observers if o is not keep)

    def stats(self) -> dict[str, Any]:
        """Queue depth, running requests, resident adapters (least recently used first), slots,
        the requests finished so far by reason (stop, length, tool_calls, cancelled, error), and the
        prefix cache's counters and size (:class:`~lora_kit.engine.prefix_cache.PrefixStats`)."""
        return {
            "queue_depth": self._scheduler.queue_depth(),
            "running": self._scheduler.running(),
            "finished": dict(self._loop.finished),
            "resident_adapters": self._runner.resident(),
            "slots": self.max_slots,
            "prefix_cache": dataclasses.asdict(self.prefix_cache.stats()),
        }
