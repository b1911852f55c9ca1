"""What a registered adapter can be exported to: ``peft`` always, ``cloudflare``, ``vllm``, ``gguf``.

The rules are the exports' own (``export.cloudflare_problems``, ``export.vllm_problems``,
``gguf.gguf_problems``): a target is listed exactly when ``lora-kit adapters export --target``
would write it. Listing is cheap enough for every ``GET /v1/models``: the adapter's config comes
from the registry's lineage record, its tensor names and shapes from the safetensors header of
the stored blob (a few KB, cached by the blob's sha256, since stored blobs never change), and the
base's architecture from its config.json.

:func:`public_json` is that record as a client sees it (the registry routes): the fields that hold
server paths (:data:`LINEAGE_PATH_FIELDS`) cut to their last component, the same paths cut where
a warning quotes them, and nothing else touched (a description stays as written).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

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


# -- the record without server paths ----------------------------------------------------------------

# The lineage fields that hold a path, as key paths. True: always a path on the machine that wrote
# it (cut whatever it looks like); False: a path or a name (a hub id, an embedded model, a
# ``datasets`` id), cut only when it is a local path (absolute, ``~``, ``./``, ``file:``).
LINEAGE_PATH_FIELDS: dict[tuple[str, ...], bool] = {
    ("source_dir",): True,
    ("run_dir",): True,
    ("base_model", "local_dir"): True,
    ("base_model", "spec"): False,
    ("lora_config", "base_model_name_or_path"): False,
    ("recipe", "model", "base"): False,
    ("recipe", "data", "train"): False,
    ("recipe", "data", "eval"): False,
    ("recipe", "output", "run_dir"): True,
    ("imported_from", "archive"): True,
}
# Lineage fields that hold a lineage of their own (a computed key's superseded value, a merge's
# source adapter): the same fields are paths there.
NESTED_LINEAGES = ("superseded", "adapter_lineage")
# Top-level fields of the record that hold a base model spec (a path or a name).
RECORD_PATH_FIELDS = ("base_model",)

_LOCAL_PATH = re.compile(r"(?:/|~|\.{1,2}[/\\]|[A-Za-z]:[/\\]|\\\\|file:)")


def is_local_path(value: str) -> bool:
    """True for what can only be a local path: absolute, ``~``, ``./``, ``../``, a drive, ``file:``."""
    return bool(_LOCAL_PATH.match(value))


def last_component(value: str) -> str:
    """A path's last component (``/home/John Smith/run dir`` -> ``run dir``; a ``file:`` URL's too)."""
    if value.startswith("file:"):
        value = unquote(urlsplit(value).path)
    parts = [p for p in re.split(r"[/\\]", value) if p]
    return parts[-1] if parts else ""


def _cut(value: Any, always: bool, found: dict[str, str]) -> Any:
    """``value`` (a path, a list of paths, or a dict keyed by path) with its paths cut; ``found``
    collects each original path and its cut form (to cut it where a message quotes it)."""
    if isinstance(value, list):
        return [_cut(v, always, found) for v in value]
    if isinstance(value, dict):
        return {_cut(k, always, found): v for k, v in value.items()}
    if not isinstance(value, str) or not (always or is_local_path(value)):
        return value
    cut = last_component(value)
    found[value] = cut
    if value.startswith("file:"):
        found[unquote(urlsplit(value).path)] = cut
    return cut


def _lineage(lineage: Any, found: dict[str, str], depth: int = 0) -> Any:
    if not isinstance(lineage, dict) or depth > 8:
        return lineage
    out = dict(lineage)
    for keys, always in LINEAGE_PATH_FIELDS.items():
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                break
            node[key] = child = dict(child)  # a copy: the version's own record is not changed
            node = child
        else:
            if keys[-1] in node:
                node[keys[-1]] = _cut(node[keys[-1]], always, found)
    for key in NESTED_LINEAGES:
        if key in out:
            out[key] = _lineage(out[key], found, depth + 1)
    return out


def quote_cut(message: str, found: dict[str, str]) -> str:
    """``message`` with every path of ``found`` it quotes cut as the record cuts it (the longest
    first, so a directory with spaces goes whole)."""
    for path in sorted(found, key=len, reverse=True):
        if len(path) > 1:
            message = message.replace(path, found[path])
    return message


def public_json(record: dict[str, Any], known: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    """A version's JSON record (:func:`version_json`) fit for a client: every field that holds a
    path (:data:`LINEAGE_PATH_FIELDS`, :data:`RECORD_PATH_FIELDS`, keys included) cut to its last
    component, and each of those paths cut in the ``warnings`` that quote it. ``known``: more
    ``(path, shown as)`` pairs to cut in the warnings (and in ``verify.problems`` when the record
    has them). Free text (description, tags, names) is left as it is."""
    found: dict[str, str] = dict(known)
    out = dict(record)
    for key in RECORD_PATH_FIELDS:
        if key in out:
            out[key] = _cut(out[key], False, found)
    if "lineage" in out:
        out["lineage"] = _lineage(out["lineage"], found)
    if isinstance(out.get("warnings"), list):
        out["warnings"] = [quote_cut(w, found) if isinstance(w, str) else w for w in out["warnings"]]
    verify = out.get("verify")
    if isinstance(verify, dict) and isinstance(verify.get("problems"), list):
        out["verify"] = {**verify, "problems": [quote_cut(str(p), found) for p in verify["problems"]]}
    return out


def stored_paths(registry: Registry, av: AdapterVersion) -> list[tuple[str, str]]:
    """Where ``registry.verify`` finds the version's files (each blob, each file of its version
    directory), each with the name a client is shown: the blob's stored name (its sha256), the file's name."""
    out = []
    for fname, meta in av.files.items():
        sha = str(meta.get("sha256") or "")
        if sha:
            out.append((str(registry.blob_path(sha)), f"blob {sha}"))
        out.append((str(registry.root / "versions" / av.id / fname), fname))
    return out
