"""What a registered adapter can be exported to: ``peft`` always, ``cloudflare``, ``vllm``, ``gguf``.

The rules are the exports' own (``export.cloudflare_problems``, ``export.vllm_problems``,
``gguf.gguf_problems``): a target is listed exactly when ``lora-kit adapters export --target``
would write it. Listing is cheap enough for every ``GET /v1/models``: the adapter's config comes
from the registry's lineage record, its tensor names and shapes from the safetensors header of
the stored blob (a few KB, cached by the blob's sha256, since stored blobs never change), and the
base's architecture from its config.json.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from lora_kit.adapters.format import WEIGHTS_FILE, InvalidAdapter, config_alpha, module_rank, parse_tensor_name
from lora_kit.adapters.validation import AdapterInfo, read_safetensors_header
from lora_kit.registry import gguf
from lora_kit.registry.export import cloudflare_model_type, cloudflare_problems, vllm_problems
from lora_kit.registry.store import AdapterVersion, Registry, RegistryError

logger = logging.getLogger(__name__)

TARGET_ORDER = ("peft", "cloudflare", "vllm", "gguf")


def header_info(weights: Path, config: dict[str, Any]) -> AdapterInfo:
    """An AdapterInfo (modules, ranks, saved tensors, flags) from the safetensors header alone."""
    modules: dict[str, dict[str, Any]] = {}
    saved: list[str] = []
    for name, meta in read_safetensors_header(weights).items():
        key = parse_tensor_name(name)
        if key is None:
            saved.append(name)
            continue
        entry = modules.setdefault(key.module, {"kind": key.kind})
        if key.kind != "dora":
            entry["kind"] = key.kind
            entry[key.part] = meta["shape"]
    for module, entry in modules.items():
        entry["rank"] = module_rank(config, module)
    targets = config.get("target_modules") or []
    return AdapterInfo(
        config=config,
        rank=max((m["rank"] for m in modules.values()), default=int(config.get("r") or 0)),
        alpha=config_alpha(config),
        target_modules=[targets] if isinstance(targets, str) else sorted(targets),
        modules=modules,
        saved_modules=saved,
    )


@functools.lru_cache(maxsize=4096)
def _cached_info(weights: str, weights_sha256: str, config_json: str) -> AdapterInfo:
    """``header_info`` memoised by content: a blob named by its sha256 never changes."""
    return header_info(Path(weights), json.loads(config_json))


def export_targets(
    info: AdapterInfo, weights_bytes: int, base_config: dict[str, Any] | None, cloudflare_type: str | None
) -> list[str]:
    """The export targets this adapter passes, in :data:`TARGET_ORDER`.

    ``weights_bytes``: the size of adapter_model.safetensors; ``base_config``: the base's
    config.json (None: the base is not on this machine, so GGUF cannot be written);
    ``cloudflare_type``: the ``model_type`` a Cloudflare export would write (None: unknown or
    not one Cloudflare takes, so the export would need ``--model-type`` or be refused).
    """
    out = ["peft"]
    if cloudflare_type is not None and not cloudflare_problems(info, weights_bytes):
        out.append("cloudflare")
    if not vllm_problems(info):
        out.append("vllm")
    if not gguf.gguf_problems(info, base_config):
        out.append("gguf")
    return out


def version_targets(registry: Registry, av: AdapterVersion) -> list[str]:
    """:func:`export_targets` of a registered version ([] when its stored files cannot be read)."""
    meta = av.files.get(WEIGHTS_FILE) or {}
    config = av.lineage.get("lora_config") if isinstance(av.lineage, dict) else None
    if not meta.get("sha256") or not isinstance(config, dict):
        return []
    blob = registry.blob_path(meta["sha256"])
    try:
        info = _cached_info(str(blob), meta["sha256"], json.dumps(config, sort_keys=True))
    except (OSError, InvalidAdapter, RegistryError, KeyError, TypeError, ValueError) as err:
        logger.warning("cannot list the export targets of %s: %s", av.ref, err)
        return []
    try:
        cloudflare_type: str | None = cloudflare_model_type(av, config)
    except RegistryError:
        cloudflare_type = None
    return export_targets(info, int(meta.get("size") or 0), gguf.base_config(av), cloudflare_type)


def version_json(registry: Registry, av: AdapterVersion) -> dict[str, Any]:
    """The one JSON record of a registered version, which every surface shapes its own view from
    (``adapters list/show --json``, the registry routes, ``/v1/models``, the fine-tunes list): its
    registry fields and ``export_targets``, what ``lora-kit adapters export --target`` can write it as."""
    return {**av.to_dict(), "export_targets": version_targets(registry, av)}
