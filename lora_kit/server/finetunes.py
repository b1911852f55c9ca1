"""Cloudflare-style fine-tune uploads on top of the registry.

Cloudflare creates a fine-tune first (``POST /ai/finetunes`` -> id), then receives its two
files one by one (``.../finetune-assets``). The registry only takes complete, valid adapter
directories, so an upload is staged in ``<home>/finetune-uploads/<id>/`` until both files are
there; then it is registered (validated by the registry, which gives the reason for a refusal)
and the staged id keeps pointing at the registered version.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from lora_kit import paths
from lora_kit.adapters.format import ADAPTER_FILES, InvalidAdapter
from lora_kit.errors import hide_paths
from lora_kit.registry.targets import public_json, version_json
from lora_kit.server import errors
from lora_kit.server.errors import ApiError

REQUIRED_FILES = ADAPTER_FILES
META = "finetune.json"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# What one asset may weigh. Cloudflare caps an adapter file at 300 MB: the weights get the server's
# upload limit (``max_upload_bytes``, 300 MiB by default); adapter_config.json is a few hundred
# bytes of JSON, so 1 MiB is plenty and keeps a mislabelled upload from filling the disk.
CONFIG_MAX_BYTES = 1024 * 1024
# Room for the multipart framing and the file_name field around the file, for the body's cap.
FORM_OVERHEAD_BYTES = 1024 * 1024


def check_asset_name(file_name: str) -> None:
    """5006/400 unless ``file_name`` is one of the adapter's two files."""
    if file_name not in REQUIRED_FILES:
        raise errors.bad_input(
            f"file_name must be one of {', '.join(REQUIRED_FILES)}, not {file_name!r}", param="file_name"
        )


def asset_limit(file_name: str, weights_limit: int) -> int:
    """The most bytes the asset ``file_name`` may have (see :data:`CONFIG_MAX_BYTES`)."""
    if file_name == "adapter_config.json":
        return min(CONFIG_MAX_BYTES, weights_limit)
    return weights_limit


def missing_files(finetune: str, missing: list[str]) -> ApiError:
    """3039/400: the fine-tune lacks required files."""
    return ApiError(
        errors.FINETUNE_MISSING_FILES,
        f"Finetune {finetune!r} is missing required files: {', '.join(missing)} "
        f"(upload {' and '.join(REQUIRED_FILES)} to /finetunes/{{id}}/finetune-assets)",
        param="lora",
    )


class FinetuneStore:
    """Staged uploads (``id -> meta``) and their registration into ``registry``."""

    def __init__(self, registry: Any, root: Optional[Path] = None) -> None:
        self.registry = registry
        self.root = Path(root) if root is not None else paths.home() / "finetune-uploads"
        self._lock = threading.Lock()

    # -- staged fine-tunes ---------------------------------------------------------------------

    def _meta_path(self, finetune_id: str) -> Path:
        return self.root / finetune_id / META

    def _load(self, finetune_id: str) -> Optional[dict[str, Any]]:
        try:
            uuid.UUID(finetune_id)
        except ValueError:
            return None
        path = self._meta_path(finetune_id)
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def _save(self, meta: dict[str, Any]) -> None:
        path = self._meta_path(meta["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path)

    def _staged(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        out = []
        for child in sorted(self.root.iterdir()):
            meta = self._load(child.name)
            if meta is not None:
                out.append(meta)
        return out

    def create(
        self, name: str, model: str, description: str = "", public: bool = False, base_model: Optional[str] = None
    ) -> dict[str, Any]:
        """A new, empty fine-tune for the served ``base_model``. The name must be a valid registry name."""
        from lora_kit.registry import RegistryError, check_name

        try:
            check_name(name, "fine-tune name")
        except RegistryError as err:
            raise errors.bad_input(f"name: {err}", param="name") from err
        now = _now()
        meta = {
            "id": str(uuid.uuid4()),
            "name": name,
            "description": description or "",
            "model": model,
            "public": bool(public),
            "base_model": base_model,
            "created_at": now,
            "modified_at": now,
            "ref": None,
        }
        with self._lock:
            self._save(meta)
        return meta

    def find(self, ref: str) -> Optional[dict[str, Any]]:
        """The staged fine-tune with this id, else the newest *pending* one with this name."""
        meta = self._load(ref)
        if meta is not None:
            return meta
        pending = [m for m in self._staged() if m["name"] == ref and not m.get("ref")]
        return max(pending, key=lambda m: m["created_at"]) if pending else None

    def staged_ref(self, ref: str) -> str:
        """The registry reference of a staged fine-tune's id (3039 while it still lacks files), else
        ``ref`` itself. Reads no database: the registry is asked once, by the caller."""
        meta = self._load(ref)
        if meta is None:
            return ref
        return self._registered_ref(ref, meta)

    def check_pending(self, ref: str) -> None:
        """3039 when ``ref``, a name the registry does not hold, names a pending upload."""
        meta = self.find(ref)
        if meta is not None:
            self._registered_ref(ref, meta)

    def _registered_ref(self, ref: str, meta: dict[str, Any]) -> str:
        if meta.get("ref"):
            return str(meta["ref"])
        have = set(os.listdir(self.root / meta["id"]))
        raise missing_files(ref, [f for f in REQUIRED_FILES if f not in have])

    def _in_registry(self, ref: str) -> bool:
        from lora_kit.registry import RegistryError

        try:
            self.registry.resolve(ref)
            return True
        except RegistryError:
            return False

    def _uploadable(self, finetune_id: str) -> dict[str, Any]:
        """The meta of a fine-tune that can still take files; 3037/404 or 5006/400 (complete) otherwise."""
        meta = self._load(finetune_id)
        if meta is None:
            if self._in_registry(finetune_id):
                raise errors.bad_input(
                    f"finetune {finetune_id!r} is complete; its files cannot be changed (create a new fine-tune)"
                )
            raise ApiError(errors.FINETUNE_NOT_FOUND, f"Finetune {finetune_id} not found")
        if meta.get("ref"):
            raise errors.bad_input(
                f"finetune {finetune_id!r} is complete; its files cannot be changed (create a new fine-tune)"
            )
        return meta

    def staging_dir(self, finetune_id: str) -> Path:
        """Where an upload to this fine-tune is spooled: checked (exists, not complete) before any body is read."""
        with self._lock:
            self._uploadable(finetune_id)
        return self.root / finetune_id

    def upload(self, finetune_id: str, file_name: str, source: Path) -> dict[str, Any]:
        """Store one asset, the file at ``source`` (in :meth:`staging_dir`), moved into place atomically;
        once both are present, register the adapter. Returns the fine-tune.

        ``source`` is consumed when the asset is stored; on a refusal it is left for the caller to delete.
        """
        from lora_kit.registry import RegistryError

        check_asset_name(file_name)
        with self._lock:
            meta = self._uploadable(finetune_id)
            stage = self.root / finetune_id
            os.replace(source, stage / file_name)
            meta["modified_at"] = _now()
            if all((stage / f).is_file() for f in REQUIRED_FILES):
                try:
                    version = self.registry.register(
                        stage,
                        meta["name"],
                        base_model=meta.get("base_model") or None,
                        description=meta.get("description") or "",
                        lineage={"source": "finetune-assets upload", "finetune_id": finetune_id},
                    )
                except (RegistryError, InvalidAdapter) as err:
                    # Drop the refused file so a corrected one can be uploaded.
                    (stage / file_name).unlink(missing_ok=True)
                    # The client sees why, never where: no upload or registry path of this server.
                    why = hide_paths(str(err), (stage, self.root, getattr(self.registry, "root", stage)))
                    raise errors.bad_input(f"the adapter was refused: {why}", param="file") from err
                meta["ref"] = version.ref
                for f in REQUIRED_FILES:
                    (stage / f).unlink(missing_ok=True)  # the registry holds its own copy now
            self._save(meta)
            return meta

    # -- listing -------------------------------------------------------------------------------

    def list(self, served_model: str) -> list[dict[str, Any]]:
        """Every registered adapter version, then every pending upload, as Cloudflare fine-tunes."""
        rows = [version_row(version_json(self.registry, v), served_model) for v in self.registry.list()]
        for meta in self._staged():
            if not meta.get("ref"):
                rows.append(public_row(meta))
        return rows


def public_row(meta: dict[str, Any]) -> dict[str, Any]:
    """A staged fine-tune in Cloudflare's ``Finetune`` shape."""
    return {
        "id": meta["id"],
        "name": meta["name"],
        "description": meta.get("description") or "",
        "model": meta["model"],
        "public": bool(meta.get("public")),
        "created_at": meta["created_at"],
        "modified_at": meta["modified_at"],
        "ready": bool(meta.get("ref")),
        "ref": meta.get("ref"),
    }


def version_row(record: dict[str, Any], served_model: str) -> dict[str, Any]:
    """A registered adapter version (its JSON record, ``version_json``) in Cloudflare's ``Finetune``
    shape, plus its registry fields and ``export_targets``."""
    return {
        "id": record["id"],
        "name": record["name"],
        "description": record["description"] or "",
        "model": public_json(record)["base_model"] or served_model,  # a local base: its name, not its path
        "public": False,
        "created_at": record["created_at"],
        "modified_at": record["created_at"],
        "ready": True,
        "ref": record["ref"],
        "version": record["version"],
        "rank": record["rank"],
        "alpha": record["alpha"],
        "target_modules": list(record["target_modules"]),
        "export_targets": list(record["export_targets"]),
    }
