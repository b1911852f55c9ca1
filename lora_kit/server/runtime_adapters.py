"""vLLM's runtime adapter API: ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``.

Operators (and Kubernetes gateways built for vLLM) manage adapters without a restart:

- ``load_lora_adapter`` ``{"lora_name": N, "lora_path": DIR}`` registers the PEFT directory
  ``DIR`` as the next version of ``N`` (unless the latest version of ``N`` holds exactly these
  files: loading twice adds no version), makes ``N`` servable again if it was unloaded, and
  warms it into an engine slot. Without ``lora_path``, ``N`` must be in the registry already.
- ``unload_lora_adapter`` ``{"lora_name": N}`` stops serving ``N``: every version and alias of it
  answers 3037/404 from then on (and leaves ``/v1/models``), and its engine slots are freed once
  the requests already running on them finish (they finish normally). A later load serves it again.

``lora_name`` is a bare name (``NAME@VERSION``/``NAME:ALIAS`` are 5006/400): both routes act on a
name and all its versions. A load checks everything before it changes anything (the directory's
files and config, the config's size, and every tensor against what the engine serves), so a
refused load registers nothing and leaves what is served as it was; registering identical files
is idempotent under concurrency (the registry compares hashes inside its write lock).

Both are management routes: off (3051/403) on a server without an API token unless it was started
with ``--enable-management``, as vLLM keeps them off unless ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is
set; with a token they need it; without one they refuse cross-site requests (3052/403, see
:func:`lora_kit.server.auth.check_same_site`) and take only ``application/json`` bodies.
``lora_path`` must lie under one of the server's adapter roots (``--adapter-root DIR``, symlinks
resolved; none by default, then only registry names load); a path outside is 5006/400, naming no
server path. They answer vLLM's plain-text ``Success: ...`` on 200. The set of unloaded names is
the server's (a runtime state, as in vLLM): a restart serves the whole registry again. On Ray
Serve every engine replica answers these routes, and the set is the cluster's
(:class:`~lora_kit.server.ray_directory.ClusterNames`): an unload answers 200 once every replica
refuses the name, and its slots are freed on every replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import MutableSet, Sequence
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
    directories a ``lora_path`` may lie under (resolved once, here). ``unloaded``: where the
    unloaded names live (default: this process's set; on Ray Serve, the cluster's, whose writes
    block until every replica has them)."""

    def __init__(
        self,
        registry: Any,
        engine: ServingEngine,
        roots: Sequence[Path | str] = (),
        unloaded: Optional[MutableSet[str]] = None,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.roots = tuple(Path(os.path.realpath(root)) for root in roots)
        self._unloaded: MutableSet[str] = set() if unloaded is None else unloaded

    def is_served(self, name: str) -> bool:
        """Whether adapter ``name`` (a bare name) is served (not unloaded at runtime)."""
        return name not in self._unloaded

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
        """Serve ``name`` (registering ``path`` first as its next version if it holds new files) and
        warm it; its reference. Every check comes before anything changes: a refused load leaves
        the registry and the served set as they were."""
        from lora_kit.registry import RegistryError

        _check_bare_name(name)
        try:
            if path is None:
                version = await asyncio.to_thread(self.registry.resolve, name)
            else:
                version = await asyncio.to_thread(self._validate_and_register, name, self.adapter_dir(path))
            ref = await asyncio.to_thread(self.engine.check_adapter, version.ref)
        except RegistryError as err:
            raise errors.bad_input(f"cannot load {name!r}: {_public(err)}", "lora_path") from None
        except LoraKitError as err:  # the adapter format's and the engine's checks
            raise errors.bad_input(f"cannot load {name!r}: {hide_paths(str(err))}", "lora_path") from None
        await asyncio.to_thread(self._unloaded.discard, name)  # only now: a failed load changes nothing
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

    def _validate_and_register(self, name: str, path: Path) -> Any:
        """Check ``path`` as uploads are checked and as this engine would serve it, then register it
        as ``name`` unless the latest version of ``name`` holds the same files; the version."""
        from lora_kit.adapters.format import CONFIG_FILE
        from lora_kit.adapters.validation import check_files
        from lora_kit.server.finetunes import CONFIG_MAX_BYTES

        config = path / CONFIG_FILE
        if config.is_file() and config.stat().st_size > CONFIG_MAX_BYTES:
            raise errors.bad_input(
                f"cannot load {name!r}: {CONFIG_FILE} is larger than {CONFIG_MAX_BYTES} bytes "
                "(the same cap as an upload's)",
                "lora_path",
            )
        try:
            check_files(path)  # refuse pickles and missing files before reading anything
            self.engine.validate_adapter(str(path), name)
        except LoraKitError:
            raise
        except Exception as err:  # noqa: BLE001 - unreadable files are the client's input, not a crash
            logger.warning("runtime load of %s: the directory cannot be read: %r", name, err)
            raise errors.bad_input(
                f"cannot load {name!r}: its files cannot be read as a PEFT LoRA adapter", "lora_path"
            ) from None
        return self.registry.register(
            path, name, description="loaded through /v1/load_lora_adapter", unless_latest_is_identical=True
        )

    async def unload(self, name: str) -> list[str]:
        """Stop serving ``name``; free its slots as their requests finish. The references dropped."""
        from lora_kit.registry import RegistryError

        _check_bare_name(name)
        if name in self._unloaded:
            raise _not_found(name)
        try:
            await asyncio.to_thread(self.registry.resolve, name)
        except RegistryError:
            raise _not_found(name) from None
        await asyncio.to_thread(self._unloaded.add, name)
        resident = [ref for ref in self.engine.stats().get("resident_adapters", []) if reference_name(ref) == name]
        dropped = [ref for ref in resident if await asyncio.to_thread(self.engine.drop_adapter, ref)]
        logger.info("runtime unload: %s is not served; slots freed for %s", name, dropped or "none")
        return dropped


def _check_bare_name(name: str) -> None:
    """5006/400 unless ``name`` is a bare adapter name: load and unload act on a name and all its
    versions (as vLLM's ``lora_name``), never on one version or alias."""
    from lora_kit.registry.store import InvalidName, check_name

    try:
        check_name(name, "lora_name")
    except InvalidName as err:
        hint = " (NAME@VERSION and NAME:ALIAS are not accepted: load and unload act on a name)"
        raise errors.bad_input(f"{err}{hint if '@' in name or ':' in name else ''}", "lora_name") from None


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
    api = APIRouter(
        prefix="/v1", dependencies=[Depends(require_management(state.api_token, state.management, state.allowed_hosts))]
    )

    plain = {"responses": errors_for("openai"), "response_class": PlainTextResponse}

    @api.post("/load_lora_adapter", openapi_extra=json_body(LoadLoraAdapter, api="openai"), **plain)
    async def load_lora_adapter(request: Request) -> Any:
        body = parse(LoadLoraAdapter, await read_json(request, state.max_body_bytes, json_type_only=True))
        await state.runtime.load(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @api.post("/unload_lora_adapter", openapi_extra=json_body(UnloadLoraAdapter, api="openai"), **plain)
    async def unload_lora_adapter(request: Request) -> Any:
        body = parse(UnloadLoraAdapter, await read_json(request, state.max_body_bytes, json_type_only=True))
        await state.runtime.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return api
