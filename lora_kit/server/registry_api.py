"""Read-only registry routes for the playground and other clients: ``/v1/lora-kit/adapters[/{ref}]``.

They sit behind the same bearer token as the inference routes and answer OpenAI-shaped errors
(their paths are under ``/v1``). What they return never names a server path: every absolute path
in a version's lineage or verify report is cut to its last component (``/srv/runs/x`` -> ``x``).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from lora_kit.registry import AdapterNotFound, AdapterVersion, InvalidReference, RegistryError
from lora_kit.registry.targets import version_targets
from lora_kit.server import errors
from lora_kit.server.auth import require_token
from lora_kit.server.errors import ApiError
from lora_kit.server.openapi import errors_for
from lora_kit.server.state import ServerState

PREFIX = "/v1/lora-kit"
# An absolute POSIX path inside a string: a "/" that starts a token (not "a/b", not "http://").
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"()\[\]{},;]+")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\[^\s'\"()\[\]{},;]*")


def _last_part(match: re.Match[str]) -> str:
    parts = [p for p in re.split(r"[/\\]", match.group(0)) if p]
    return parts[-1] if parts else ""


def strip_paths(value: Any) -> Any:
    """``value`` (JSON-like) with every absolute path in its strings cut to its last component."""
    if isinstance(value, str):
        return _WINDOWS_PATH.sub(_last_part, _ABS_PATH.sub(_last_part, value))
    if isinstance(value, dict):
        return {str(k): strip_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strip_paths(v) for v in value]
    return value


def version_summary(v: AdapterVersion) -> dict[str, Any]:
    """One version as listed: ``{ref, name, version, id, created_at, description, tags, rank, alpha, aliases}``."""
    return strip_paths(
        {
            "ref": v.ref,
            "name": v.name,
            "version": v.version,
            "id": v.id,
            "created_at": v.created_at,
            "description": v.description,
            "tags": list(v.tags),
            "rank": v.rank,
            "alpha": v.alpha,
            "aliases": list(v.aliases),
        }
    )


def adapters_listing(versions: list[AdapterVersion]) -> list[dict[str, Any]]:
    """The registry grouped by adapter: ``[{name, latest, aliases: {alias: version}, versions: [...]}]``."""
    grouped: dict[str, dict[str, Any]] = {}
    for v in versions:  # ordered by name, then version
        entry = grouped.setdefault(v.name, {"name": v.name, "latest": v.ref, "aliases": {}, "versions": []})
        entry["latest"] = v.ref
        entry["aliases"].update({alias: v.version for alias in v.aliases})
        entry["versions"].append(version_summary(v))
    return list(grouped.values())


def version_detail(registry: Any, v: AdapterVersion) -> dict[str, Any]:
    """One version in full: the summary plus files, warnings, lineage, ``verify: {ok, problems}``
    (the stored files re-hashed now) and ``export_targets`` (``["peft", "cloudflare", ...]``)."""
    problems = registry.verify(v.id)
    detail = {
        **version_summary(v),
        "base_model": v.base_model,
        "target_modules": list(v.target_modules),
        "files": v.files,
        "warnings": list(v.warnings),
        "lineage": v.lineage,
        "verify": {"ok": not problems, "problems": problems},
        "export_targets": version_targets(registry, v),
    }
    return strip_paths(detail)


def _resolve(registry: Any, ref: str) -> AdapterVersion:
    """The version ``ref`` names; 400 for a malformed reference, 404 for a missing one (no paths in either)."""
    try:
        return registry.resolve(ref)
    except InvalidReference as err:
        raise errors.bad_input(str(err), "ref") from None
    except AdapterNotFound as err:
        raise ApiError(errors.FINETUNE_NOT_FOUND, err.public, param="ref", openai_code="adapter_not_found") from None
    except RegistryError as err:
        raise ApiError(errors.INTERNAL, strip_paths(str(err))) from None


def router(state: ServerState) -> APIRouter:
    """The read-only registry routes, behind the bearer token when one is set."""
    api = APIRouter(prefix=PREFIX, dependencies=[Depends(require_token(state.api_token))])

    @api.get("/adapters", responses=errors_for("openai"))
    async def list_adapters() -> Any:
        """Every adapter with its versions and aliases."""
        versions = await run_in_threadpool(state.registry.list)
        return {"object": "list", "base_model": state.served_model, "data": adapters_listing(versions)}

    @api.get("/adapters/{ref}", responses=errors_for("openai"))
    async def show_adapter(ref: str) -> Any:
        """One version (``NAME``, ``NAME@V``, ``NAME:ALIAS`` or id): lineage, verify status, export targets."""

        def detail() -> dict[str, Any]:
            return version_detail(state.registry, _resolve(state.registry, ref))

        return await run_in_threadpool(detail)

    return api
