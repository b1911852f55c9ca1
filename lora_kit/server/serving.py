"""What the HTTP app needs of an engine: :class:`ServingEngine`, met by a local
:class:`~lora_kit.engine.Engine` and by a Ray Serve replica's :class:`~lora_kit.server.ray_app.ReplicaEngine`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from lora_kit.engine.types import GenerationOutput, GenerationRequest, ResolvedAdapter


@runtime_checkable
class ServingEngine(Protocol):
    """The engine behind the routes (the server reaches nothing else of it)."""

    model_name: str  # the name clients use for the base model
    tokenizer: Any  # renders prompts (chat template) for the engine

    def resolve(self, ref: str) -> ResolvedAdapter:
        """What ``ref`` names: canonical ``NAME@VERSION``, directory, files; engine errors otherwise."""

    def check_adapter(self, ref: str | ResolvedAdapter) -> str:
        """Load ``ref`` where it will run (a resolution is not looked up again); its canonical reference."""

    def validate_adapter(self, path: str, name: str) -> None:
        """Check that directory ``path`` could be served as ``name`` (nothing loaded or kept); AdapterError if not."""

    def drop_adapter(self, key: str) -> bool:
        """Free resident adapter ``key`` once its running requests finish (a runtime unload)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """The request's events; errors known at submission raise at this call."""

    def stats(self) -> dict[str, Any]:
        """Queue depth, running requests, finished counts, resident adapters, slots."""

    def start(self) -> None:
        """Start serving (idempotent)."""

    def stop(self, timeout: float = 10.0, *, shutting_down: bool = False) -> None:
        """Stop; ``shutting_down``: for good, failing what is left with ShuttingDown."""
