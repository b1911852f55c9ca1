"""The engine facade: one base model, adapter slots, and the continuous-batching scheduler."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch

from lora_kit import chat
from lora_kit.engine import bgmv
from lora_kit.engine.adapters import Resolver, load_adapter, registry_resolver
from lora_kit.engine.constraints import GrammarCache
from lora_kit.engine.lora_layer import LoraContext, wrap_linear_layers
from lora_kit.engine.packed_linear import copy_unpacked_weights, pack_output_head
from lora_kit.engine.sampling import RequestSampler
from lora_kit.engine.scheduler import Scheduler, Sequence
from lora_kit.engine.slots import NoFreeSlot, SlotManager
from lora_kit.engine.threads import engine_threads, run_in_thread
from lora_kit.engine.types import (
    EngineError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequest,
    UnknownAdapter,
)


def _pack(model: Any, layers: dict[str, Any], batch_hint: int) -> int:
    """Pack what oneDNN can take; the number of layers packed (head included)."""
    packed = sum(layer.pack(batch_hint) for layer in layers.values()) + int(pack_output_head(model, batch_hint))
    if packed:
        copy_unpacked_weights(model)
    return packed


ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in ADAPTER_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in ADAPTER_DTYPES:
        return ADAPTER_DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, not {value!r}")


class Engine:
    """Serve many LoRA adapters from one base model, every request with its own adapter.

    ``adapter_resolver(ref) -> (canonical key, adapter dir)`` finds adapters; by default the
    lora-kit registry at ``registry_root``. ``model``/``tokenizer`` may be passed pre-loaded
    (the engine takes the model over: it wraps its linear layers in place).
    ``pack_weights``: on the CPU, dense fp32/bf16 linear weights (and the output head) are
    repacked for oneDNN, ~1.8x faster decoding (``lora_kit.engine.packed_linear``); False
    keeps transformers' kernels, bit for bit. ``cpu_kernel``: on the CPU, add the rows'
    LoRA products with the BGMV kernel (``lora_kit.engine.bgmv``, built once per machine);
    False, or a machine where it cannot be built, uses torch's ``bmm``.
    ``adapter_dtype``: the dtype adapters are held in (default: the model's compute dtype).
    ``"bfloat16"`` on an fp32 CPU model halves the bytes every adapter row reads per step
    (the kernel widens them to fp32 as it reads); each A/B weight is then rounded to bf16
    (~3 significant digits), so outputs differ slightly from PEFT's fp32 adapters.
    """

    def __init__(
        self,
        model_spec: str = "smollm2-135m-instruct",
        *,
        quantization: str = "none",
        max_slots: int = 8,
        preload: Seq[str] = (),
        max_queue: int = 64,
        max_batch: int = 16,
        adapter_resolver: Resolver | None = None,
        registry_root: Path | str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        max_rank: int = 256,
        threads: int | None = None,
        pack_weights: bool = True,
        cpu_kernel: bool = True,
        adapter_dtype: torch.dtype | str | None = None,
    ) -> None:
        from lora_kit import models

        self.threads = threads or engine_threads()
        if model is None:
            model = run_in_thread(lambda: models.load_model(model_spec, quantization), self.threads)  # type: ignore[arg-type]
        if tokenizer is None:
            tokenizer = models.load_tokenizer(model_spec)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_spec
        self.max_slots = max_slots
        self.max_rank = max_rank
        embed = model.get_input_embeddings().weight
        # LoRA weights live in the compute dtype (the embeddings are never 4-bit) on the model's device.
        self.device: torch.device = embed.device
        self.dtype: torch.dtype = embed.dtype
        self.adapter_dtype = _parse_dtype(adapter_dtype) if adapter_dtype is not None else self.dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.stop_ids = chat.stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        self._resolver = adapter_resolver or registry_resolver(registry_root)
        self._ctx = LoraContext()
        # The kernel adds fp32 rows on the CPU; other devices and dtypes take torch's products.
        fits = self.device.type == "cpu" and self.dtype == torch.float32 and max_rank <= bgmv.MAX_RANK
        self.cpu_kernel = bool(
            cpu_kernel and fits and self.adapter_dtype in (torch.float32, torch.bfloat16) and bgmv.load()
        )
        self._ctx.kernel = bgmv.op() if self.cpu_kernel else None
        self._layers = wrap_linear_layers(model, self._ctx)
        self.packed_layers = 0
        if pack_weights:
            hint = max(8, min(max_batch, 32))
            self.packed_layers = run_in_thread(lambda: _pack(model, self._layers, hint), self.threads)
        self._base_shapes = {name: (layer.in_features, layer.out_features) for name, layer in self._layers.items()}
        self._slots = SlotManager(self._layers, self._ctx, max_slots, self._load)
        self._model_lock = self._slots.lock
        self._grammar: GrammarCache | None = None
        self._grammar_lock = threading.Lock()
        max_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self._scheduler = Scheduler(
            model, tokenizer, self._ctx, self._slots, self._model_lock, self.stop_ids, self._grammar_cache,
            max_batch=max_batch, max_queue=max_queue, max_length=max_length, threads=self.threads,
        )  # fmt: skip
        self._thread: threading.Thread | None = None
        if len(preload) > max_slots:
            raise EngineError(f"cannot preload {len(preload)} adapters into {max_slots} slots")
        for ref in preload:
            key = self.check_adapter(ref)
            with self._model_lock:
                self._slots.pin(key)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the decode loop in a background thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._scheduler.stopping = False
        self._thread = threading.Thread(target=self._scheduler.run, name="lora-kit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every request in flight or waiting, and join the decode loop."""
        with self._scheduler.cond:
            self._scheduler.stopping = True
            self._scheduler.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self._scheduler.cancel_all()
        with self._scheduler.cond:  # stopped, not closed: new requests may queue for the next start()
            self._scheduler.stopping = False

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- adapters ------------------------------------------------------------------------

    def _load(self, key: str, path: Path) -> Any:
        return load_adapter(key, path, self._base_shapes, self.adapter_dtype, self.device, self.max_rank)

    def _resolve(self, ref: str) -> tuple[str, Path]:
        try:
            return self._resolver(ref)
        except EngineError:
            raise
        except (KeyError, LookupError, FileNotFoundError) as err:
            raise UnknownAdapter(f"unknown adapter '{ref}'") from err

    def check_adapter(self, ref: str) -> str:
        """Resolve ``ref`` and load it into a slot now; returns the canonical reference.

        Raises UnknownAdapter or AdapterError, so a server can answer 4xx before streaming.
        When every slot is busy the adapter is loaded and checked, and takes a slot later.
        """
        key, path = self._resolve(ref)
        with self._model_lock:
            try:
                self._slots.acquire(key, path, hold=False)
            except NoFreeSlot:
                self._load(key, path)
        return key

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
        if len(ids) >= self._scheduler.max_length:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; the model's context is {self._scheduler.max_length}"
            )
        key, path = self._resolve(request.adapter) if request.adapter else (None, None)
        constraint = None
        if request.response_format or request.tools:
            constraint = self._grammar_cache().constraint(request.response_format, request.tools, request.tool_choice)
        sampler = RequestSampler(request.params, ids, self.vocab_size, self.device)
        return Sequence(request=request, adapter_key=key, adapter_path=path, sampler=sampler, constraint=constraint)

    def submit(self, request: GenerationRequest) -> Sequence:
        """Validate and queue a request without starting the loop; read it with
        :meth:`stream` or :meth:`result`. Raises InvalidRequest, UnknownAdapter or Overloaded now."""
        seq = self._sequence(request)
        self._scheduler.submit(seq)
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

    def stats(self) -> dict[str, Any]:
        """Queue depth, running requests, resident adapters (least recently used first), slots,
        and the requests finished so far by reason (stop, length, tool_calls, cancelled, error)."""
        return {
            "queue_depth": len(self._scheduler.waiting),
            "running": len(self._scheduler.batch),
            "finished": dict(self._scheduler.finished),
            "resident_adapters": self._slots.resident(),
            "slots": self.max_slots,
        }
