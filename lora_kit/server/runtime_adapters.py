"""vLLM's runtime adapter API: ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``.

Operators (and Kubernetes gateways built for vLLM) manage adapters without a restart:

- ``load_lora_adapter`` ``{"lora_name": N, "lora_path": DIR}`` registers the PEFT directory
  ``DIR`` as the next version of ``N`` (unless the latest version of ``N`` holds exactly these
  files: loading twice adds no version), makes ``N`` servable again if it was unloaded, and
  warms it into an engine slot. Without ``lora_path``, ``N`` must be in the registry already.
- ``unload_lora_adapter`` ``{"lora_name": N}`` stops serving ``N``: every version and alias of it
  answers 3037/404 from then on, and its engine slots are freed once the requests already running
  on them finish (they finish normally). A later load serves it again.

Both are management routes: off (3051/403) on a server without an API token unless it was started
with ``--enable-management``, as vLLM keeps them off unless ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is
set; with a token they need it. ``lora_path`` must lie under one of the server's adapter roots
(``--adapter-root DIR``, symlinks resolved; none by default, then only registry names load); a path
outside is 5006/400, naming no server path. They answer vLLM's plain-text ``Success: ...`` on 200. The set of unloaded names is the server's (a runtime state, as in
vLLM): a restart serves the whole registry again. The engine behind is a local
:class:`~lora_kit.engine.Engine` or the Ray gateway's proxy, which forwards drops to every replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from lora_kit.errors import LoraKitError, hide_paths
from lora_kit.registry.store import reference_name
from lora_kit.server import errors
from lora_kit.server.auth import require_management
from lora_kit.server.bodies import read_json
from lora_kit.server.errors import ApiError
from lora_kit.server.openapi import errors_for, json_body
from lora_kit.server.schemas import LoadLoraAdapter, UnloadLoraAdapter, parse
from lora_kit.server.serving import ServingEngine

logger = logging.getLogger(__name__)


class RuntimeAdapters:
    """Which registry adapters the server serves: all but the unloaded names. ``roots``: the
    directories a ``lora_path`` may lie under (resolved once, here)."""

    def __init__(self, registry: Any, engine: ServingEngine, roots: Sequence[Path | str] = ()) -> None:
        self.registry = registry
        self.engine = engine
        self.roots = tuple(Path(os.path.realpath(root)) for root in roots)
        self._unloaded: set[str] = set()

    def check_served(self, ref: Optional[str], asked: str) -> None:
        """3037/404 when canonical ``ref`` belongs to an unloaded name (the message names what was asked)."""
        if ref is not None and reference_name(ref) in self._unloaded:
            raise ApiError(
                errors.FINETUNE_NOT_FOUND,
                f"Finetune {asked!r} not found: it was unloaded (POST /v1/load_lora_adapter serves it again)",
                param="lora",
                openai_code="model_not_found",
            )

    async def load(self, name: str, path: Optional[str]) -> str:
        """Register ``path`` as ``name`` if it holds new files, serve ``name`` again, warm it; its reference."""
        from lora_kit.registry import RegistryError

        try:
            if path is not None:
                await asyncio.to_thread(self._register, name, path)
            version = await asyncio.to_thread(self.registry.resolve, name)
        except RegistryError as err:
            raise errors.bad_input(f"cannot load {name!r}: {_public(err)}", "lora_path") from None
        self._unloaded.discard(name)
        try:
            ref = await asyncio.to_thread(self.engine.check_adapter, version.ref)
        except LoraKitError as err:
            self._unloaded.add(name)  # not servable: keep it out, as it was not loaded
            raise errors.bad_input(f"cannot load {name!r}: {hide_paths(str(err))}", "lora_path") from None
        logger.info("runtime load: %s is served (%s)", name, ref)
        return str(ref)

    def adapter_dir(self, lora_path: str) -> Path:
        """The real directory ``lora_path`` names, under one of :attr:`roots`; 5006/400 otherwise.

        Containment is checked on the path with every symlink resolved, before anything says
        whether the path exists; no message names a server path."""
        if not self.roots:
            raise errors.bad_input(
                "lora_path is off on this server (it was started without --adapter-root); "
                'load a registered adapter with {"lora_name": NAME} alone',
                "lora_path",
            )
        if not os.path.isabs(lora_path):
            raise errors.bad_input("lora_path must be an absolute path", "lora_path")
        real = Path(os.path.realpath(lora_path))
        if not any(real.is_relative_to(root) for root in self.roots):
            raise errors.bad_input("lora_path is outside the server's adapter roots (--adapter-root)", "lora_path")
        if not real.is_dir():
            raise errors.bad_input("lora_path is not a PEFT adapter directory on the server", "lora_path")
        return real

    def _register(self, name: str, lora_path: str) -> None:
        from lora_kit.registry import STORED_FILES, RegistryError, sha256_file

        path = self.adapter_dir(lora_path)
        try:
            latest = self.registry.resolve(name)
        except RegistryError:
            latest = None
        if latest is not None and all(
            (path / f).is_file() and sha256_file(path / f) == latest.files[f]["sha256"] for f in STORED_FILES
        ):
            return  # the same files as the latest version: no new version
        self.registry.register(path, name, description="loaded through /v1/load_lora_adapter")

    async def unload(self, name: str) -> list[str]:
        """Stop serving ``name``; free its slots as their requests finish. The references dropped."""
        from lora_kit.registry import RegistryError

        if name in self._unloaded:
            raise _not_found(name)
        try:
            await asyncio.to_thread(self.registry.resolve, name)
        except RegistryError:
            raise _not_found(name) from None
        self._unloaded.add(name)
        resident = [ref for ref in self.engine.stats().get("resident_adapters", []) if reference_name(ref) == name]
        dropped = [ref for ref in resident if await asyncio.to_thread(self.engine.drop_adapter, ref)]
        logger.info("runtime unload: %s is not served; slots freed for %s", name, dropped or "none")
        return dropped


def _not_found(name: str) -> ApiError:
    return ApiError(
        errors.FINETUNE_NOT_FOUND,
        f"The LoRA adapter {name!r} cannot be found (or is already unloaded)",
        param="lora_name",
        openai_code="model_not_found",
    )


def _public(err: Exception) -> str:
    """A registry error's message for the client: its public form, without server paths."""
    return hide_paths(str(getattr(err, "public", None) or err))


def router(state: Any) -> APIRouter:
    """The two routes: management, behind the bearer token when one is set, else off unless enabled."""
    api = APIRouter(prefix="/v1", dependencies=[Depends(require_management(state.api_token, state.management))])

    plain = {"responses": errors_for("openai"), "response_class": PlainTextResponse}

    @api.post("/load_lora_adapter", openapi_extra=json_body(LoadLoraAdapter, api="openai"), **plain)
    async def load_lora_adapter(request: Request) -> Any:
        body = parse(LoadLoraAdapter, await read_json(request, state.max_body_bytes))
        await state.runtime.load(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @api.post("/unload_lora_adapter", openapi_extra=json_body(UnloadLoraAdapter, api="openai"), **plain)
    async def unload_lora_adapter(request: Request) -> Any:
        body = parse(UnloadLoraAdapter, await read_json(request, state.max_body_bytes))
        await state.runtime.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return api
