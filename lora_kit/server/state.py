"""The objects every route needs, built once by :func:`lora_kit.server.app.create_app`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Optional, Union

from lora_kit.engine.types import AdapterWeight, ResolvedAdapter, UnknownAdapter
from lora_kit.server import errors
from lora_kit.server.errors import ApiError
from lora_kit.server.finetunes import FinetuneStore
from lora_kit.server.generation import ChosenAdapters, Runner, engine_error
from lora_kit.server.metrics import Metrics
from lora_kit.server.runtime_adapters import RuntimeAdapters
from lora_kit.server.schemas import LoraWeight
from lora_kit.server.serving import ServingEngine


@dataclass
class ServerState:
    engine: ServingEngine
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
    allowed_hosts: tuple[str, ...] = ()  # Host names management answers under without a token (--allowed-host)

    @property
    def served_model(self) -> str:
        """The name clients use for the base model (the engine's model name)."""
        return str(self.engine.model_name)

    async def resolve_lora(self, lora: Union[str, list[LoraWeight], None]) -> ChosenAdapters:
        """What a ``lora`` value runs with, resolved once, in a worker thread (the registry is SQLite
        and loading into a slot waits for the model lock): a name (NAME@V, alias, or fine-tune id)
        or a weighted mix, as canonical references with their resolutions. 3037/404 names the
        unknown or unloaded one; 3039/400 a fine-tune still missing files."""
        if lora is None:
            return ChosenAdapters(None)
        return await asyncio.to_thread(self._choose, lora)

    def _choose(self, lora: Union[str, list[LoraWeight]]) -> ChosenAdapters:
        if isinstance(lora, str):
            one = self._served(lora)
            return ChosenAdapters(one.key, {one.key: one})
        by_key: dict[str, ResolvedAdapter] = {}
        mix = []
        for entry in lora:  # names are distinct (the schema); two may still name one version
            resolved = self._served(entry.name)
            if resolved.key in by_key:
                raise errors.bad_input(
                    f"lora: the mix names {resolved.key} twice ({entry.name!r} is another name for it): "
                    "give each adapter once, with its whole scale",
                    "lora",
                )
            by_key[resolved.key] = resolved
            mix.append(AdapterWeight(resolved.key, entry.scale))
        return ChosenAdapters(mix, by_key)

    def _served(self, ref: str) -> ResolvedAdapter:
        """``ref`` resolved (one registry lookup) and warmed into a slot; blocking."""
        asked = self.finetunes.staged_ref(ref)  # a staged fine-tune id -> its registry reference
        self.runtime.check_served(asked, ref)  # an unloaded name is not even resolved
        try:
            resolved = self.engine.resolve(asked)
            self.runtime.check_served(resolved.key, ref)  # a version id or fine-tune id of an unloaded name
            self.engine.check_adapter(resolved)
        except UnknownAdapter as err:
            self.finetunes.check_pending(ref)  # a name whose upload lacks files: 3039, not 404
            raise engine_error(err, asked) from err
        except ApiError:
            raise
        except Exception as err:  # noqa: BLE001 - mapped to an API error
            raise engine_error(err, asked) from err
        return resolved
