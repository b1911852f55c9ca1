"""Read-only registry routes for the playground and other clients: ``/v1/lora-kit/adapters[/{ref}]``.

They sit behind the same bearer token as the inference routes and answer OpenAI-shaped errors
(their paths are under ``/v1``). What they return never names a server path: the fields of a
version's record that hold paths (its lineage's source and run directories, base model, dataset
paths...) are cut to their last component (``/srv/John Smith/run dir`` -> ``run dir``), and so are
those paths and the stored files' where a warning or a verify problem quotes them, by
:func:`lora_kit.registry.targets.public_json`. Free text (a description, tags) is returned as written.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from lora_kit.errors import hide_paths
from lora_kit.registry import AdapterNotFound, AdapterVersion, InvalidReference, RegistryError
from lora_kit.registry.targets import public_json, stored_paths, version_json
from lora_kit.server import errors
from lora_kit.server.auth import require_token
from lora_kit.server.errors import ApiError
from lora_kit.server.openapi import errors_for
from lora_kit.server.state import ServerState

PREFIX = "/v1/lora-kit"


SUMMARY_FIELDS = (
    "ref",
    "name",
    "version",
    "id",
    "created_at",
    "description",
    "tags",
    "rank",
    "alpha",
    "aliases",
    "export_targets",
)


def version_summary(record: dict[str, Any]) -> dict[str, Any]:
    """One version as listed: the :data:`SUMMARY_FIELDS` of its JSON record (``version_json``), none a path."""
    return {key: record[key] for key in SUMMARY_FIELDS}


def adapters_listing(registry: Any, versions: list[AdapterVersion]) -> list[dict[str, Any]]:
    """The registry grouped by adapter: ``[{name, latest, aliases: {alias: version}, versions: [...]}]``."""
    grouped: dict[str, dict[str, Any]] = {}
    for v in versions:  # ordered by name, then version
        entry = grouped.setdefault(v.name, {"name": v.name, "latest": v.ref, "aliases": {}, "versions": []})
        entry["latest"] = v.ref
        entry["aliases"].update({alias: v.version for alias in v.aliases})
        entry["versions"].append(version_summary(version_json(registry, v)))
    return list(grouped.values())


def version_detail(registry: Any, v: AdapterVersion) -> dict[str, Any]:
    """One version in full: its JSON record (files, warnings, lineage, ``export_targets``, ...) and
    ``verify: {ok, problems}`` (the stored files re-hashed now)."""
    problems = registry.verify(v.id)
    record = {**version_json(registry, v), "verify": {"ok": not problems, "problems": problems}}
    return public_json(record, known=stored_paths(registry, v))


def _resolve(registry: Any, ref: str) -> AdapterVersion:
    """The version ``ref`` names; 400 for a malformed reference, 404 for a missing one (no paths in either)."""
    try:
        return registry.resolve(ref)
    except InvalidReference as err:
        raise errors.bad_input(str(err), "ref") from None
    except AdapterNotFound as err:
        raise ApiError(errors.FINETUNE_NOT_FOUND, err.public, param="ref", openai_code="adapter_not_found") from None
    except RegistryError as err:
        raise ApiError(errors.INTERNAL, hide_paths(str(err))) from None


def router(state: ServerState) -> APIRouter:
    """The read-only registry routes, behind the bearer token when one is set."""
    api = APIRouter(prefix=PREFIX, dependencies=[Depends(require_token(state.api_token))])

    @api.get("/adapters", responses=errors_for("openai"))
    async def list_adapters() -> Any:
        """Every adapter with its versions and aliases."""

        def listing() -> list[dict[str, Any]]:
            return adapters_listing(state.registry, state.registry.list())

        return {"object": "list", "base_model": state.served_model, "data": await run_in_threadpool(listing)}

    @api.get("/adapters/{ref}", responses=errors_for("openai"))
    async def show_adapter(ref: str) -> Any:
        """One version (``NAME``, ``NAME@V``, ``NAME:ALIAS`` or id): lineage, verify status, export targets."""

        def detail() -> dict[str, Any]:
            return version_detail(state.registry, _resolve(state.registry, ref))

        return await run_in_threadpool(detail)

    return api
