"""Lineage: the one record of where an adapter version came from.

Every way into the registry (``lora-kit train``, ``adapters add``, a server fine-tune upload,
an archive import) goes through :func:`build`, so a version's lineage has the same shape
whichever way it entered. The builder computes what it can check itself (the base model and
its fingerprint, the LoRA config, the tokenizer and chat-template hashes, the parent); a
caller adds facts only it knows (the recipe, dataset fingerprints, the data audit, metrics,
the run directory). Caller facts never replace a computed key: a computed key describes the
files being registered, while a caller's copy may describe another machine (an imported
archive carries its source registry's lineage) or use another definition. A caller's value
that differs from the computed one is kept, for the record, under ``superseded``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_kit import __version__
from lora_kit.adapters import validation
from lora_kit.adapters.format import InvalidAdapter

# Files of a tokenizer / chat template that, when saved next to an adapter, are hashed into lineage.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# The keys :func:`build` computes; a caller's fact with one of these names is dropped.
COMPUTED_KEYS = frozenset(
    {
        "lora_kit_version",
        "lora_config",
        "source_dir",
        "base_model",
        "tokenizer_sha256",
        "chat_template_sha256",
        "parent",
        "superseded",
    }
)


def hash_files(directory: Path, names: tuple[str, ...]) -> str | None:
    """One sha256 over the named files that exist in ``directory`` (name + content), or None."""
    present = [n for n in names if (Path(directory) / n).is_file()]
    if not present:
        return None
    digest = hashlib.sha256()
    for n in present:
        digest.update(n.encode() + b"\0" + bytes.fromhex(sha256_file(Path(directory) / n)))
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def chat_template_sha256(adapter_dir: Path) -> str | None:
    """The hash of the chat template saved next to an adapter (the trainer always writes one)."""
    return hash_files(adapter_dir, CHAT_TEMPLATE_FILES)


def base_fingerprint(base_dir: Path) -> str | None:
    """A cheap content hash of a local base model: its config.json + every weight's name and shape.

    Reads only the safetensors headers, not the gigabytes of weights. None when the base has no
    safetensors weights (nothing cheap to hash beyond a config any copy could share).
    """
    try:
        shapes = validation.base_weight_shapes(base_dir)
    except InvalidAdapter:
        return None
    digest = hashlib.sha256((Path(base_dir) / "config.json").read_bytes())
    digest.update(json.dumps(shapes, sort_keys=True).encode())
    return digest.hexdigest()


def build(
    adapter_dir: Path,
    lora_config: Mapping[str, Any],
    base_spec: str | None,
    base_dir: Path | None,
    *,
    parent: Mapping[str, Any] | None = None,
    facts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The lineage of the adapter in ``adapter_dir``.

    ``lora_config`` is its parsed adapter_config.json, ``base_spec`` the base the user named
    and ``base_dir`` where that base is on this machine (None: not available, no fingerprint),
    ``parent`` the ``{"ref", "id"}`` of the version it derives from. ``facts`` are the caller's
    additions; a fact named like a computed key (:data:`COMPUTED_KEYS`) does not replace it: when
    it differs (an archive's source ``source_dir``, hashes of files that did not travel with the
    archive), it goes under ``superseded``.
    """
    facts = dict(facts or {})
    out: dict[str, Any] = {k: v for k, v in facts.items() if k not in COMPUTED_KEYS}
    out["lora_kit_version"] = __version__
    out["lora_config"] = dict(lora_config)
    out["source_dir"] = str(Path(adapter_dir).resolve())
    if base_spec:
        out["base_model"] = {"spec": base_spec}
        if base_dir is not None:
            out["base_model"].update({"local_dir": str(base_dir), "fingerprint": base_fingerprint(base_dir)})
    tokenizer = hash_files(adapter_dir, TOKENIZER_FILES)
    if tokenizer:
        out["tokenizer_sha256"] = tokenizer
    template = chat_template_sha256(adapter_dir)
    if template:
        out["chat_template_sha256"] = template
    if parent:
        out["parent"] = dict(parent)
    superseded = {k: v for k, v in facts.items() if k in COMPUTED_KEYS and out.get(k) != v}
    if superseded:
        out["superseded"] = superseded
    return out
