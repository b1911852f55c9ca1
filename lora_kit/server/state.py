"""The objects every route needs, built once by :func:`lora_kit.server.app.create_app`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from lora_kit.server.finetunes import FinetuneStore
from lora_kit.server.generation import Runner
from lora_kit.server.metrics import Metrics

if TYPE_CHECKING:
    from lora_kit.engine import Engine


@dataclass
class ServerState:
    engine: Engine
    registry: Any
    runner: Runner
    metrics: Metrics
    finetunes: FinetuneStore
    api_token: Optional[str]
    max_body_bytes: int
    max_upload_bytes: int
    max_tokens_cap: int

    @property
    def served_model(self) -> str:
        """The name clients use for the base model (the engine's model name)."""
        return str(self.engine.model_name)

    async def resolve_lora(self, ref: Optional[str]) -> Optional[str]:
        """The canonical adapter reference for a ``lora`` value (name, NAME@V, alias, or fine-tune id)."""
        if ref is None:
            return None
        return await self.runner.check_adapter(self.finetunes.translate(ref))
