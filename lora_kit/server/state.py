"""The objects every route needs, built once by :func:`lora_kit.server.app.create_app`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from lora_kit.engine.types import AdapterSpec, AdapterWeight
from lora_kit.server.finetunes import FinetuneStore
from lora_kit.server.generation import Runner
from lora_kit.server.metrics import Metrics
from lora_kit.server.runtime_adapters import RuntimeAdapters
from lora_kit.server.schemas import LoraWeight

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
    runtime: RuntimeAdapters  # which registry adapters are served (vLLM's runtime load/unload)
    management: bool = False  # uploads and runtime load/unload without a token (--enable-management)

    @property
    def served_model(self) -> str:
        """The name clients use for the base model (the engine's model name)."""
        return str(self.engine.model_name)

    async def resolve_lora(self, lora: Union[str, list[LoraWeight], None]) -> AdapterSpec:
        """What a ``lora`` value runs with: the canonical reference of a name (NAME@V, alias, or
        fine-tune id), or a weighted mix of canonical references; 3037/404 names the unknown one."""
        if lora is None or isinstance(lora, str):
            return await self._served(lora)
        mix = []
        for entry in lora:
            mix.append(AdapterWeight(str(await self._served(entry.name)), entry.scale))
        return mix

    async def _served(self, ref: Optional[str]) -> Optional[str]:
        """The canonical reference of ``ref``; 3037/404 when it is unknown or its name was unloaded."""
        if ref is None:
            return None
        translated = self.finetunes.translate(ref)
        self.runtime.check_served(translated, ref)  # before loading it into a slot, when it names the name
        canonical = await self.runner.check_adapter(translated)
        self.runtime.check_served(canonical, ref)  # a version id or fine-tune id of an unloaded name
        return canonical
