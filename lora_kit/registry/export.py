"""Export registered adapters for other servers (PEFT, Cloudflare Workers AI, vLLM, llama.cpp's
GGUF) and move them between registries as ``.tar.gz`` archives.

Cloudflare's rules are those of its Workers AI fine-tune upload ("Bring your own LoRA"):
``adapter_config.json`` must carry ``model_type`` (mistral, llama or gemma), the rank is at
most 32 and the weights file under 300 MB. vLLM's: ``--max-lora-rank`` takes one of
``VLLM_RANKS`` (default 16) and adapters with saved whole modules are refused.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_kit.adapters.format import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, InvalidAdapter
from lora_kit.adapters.validation import AdapterInfo, base_model_type, validate_adapter_dir
from lora_kit.registry import gguf
from lora_kit.registry.store import STORED_FILES, AdapterVersion, Registry, RegistryError, local_base_dir, sha256_file

TARGETS = ("peft", "cloudflare", "vllm", "gguf")
CLOUDFLARE_MAX_RANK = 32
CLOUDFLARE_MAX_BYTES = 300 * 1000 * 1000  # "adapter file < 300 MB"; decimal MB is the stricter reading
CLOUDFLARE_MODEL_TYPES = ("mistral", "llama", "gemma")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # allowed --max-lora-rank values
VLLM_DEFAULT_MAX_RANK = 16
MANIFEST = "lora-kit-adapter.json"
ARCHIVE_FORMAT = 1
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# The most an archive member may hold (Cloudflare's and the server's limit on an adapter file):
# a gzip bomb is refused before it writes more than this, whatever its tar header claims.
MAX_MEMBER_BYTES = 300 * 1024 * 1024
_SHA256_CHARS = frozenset("0123456789abcdef")


@dataclass
class ExportResult:
    path: Path
    target: str
    notes: list[str] = field(default_factory=list)  # lines to show the user (e.g. vLLM flags)


def _fresh_dir(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RegistryError(f"export destination '{dest}' exists and is not an empty directory")


def _write_dir(dest: Path, files: dict[str, bytes | Path]) -> None:
    """Write ``files`` into ``dest`` atomically: build a sibling temp dir, then rename it."""
    _fresh_dir(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_bytes(content)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cloudflare_model_type(av: AdapterVersion, config: dict, override: str | None = None) -> str:
    """The ``model_type`` Cloudflare wants: explicit, else the local base's, else guessed from names."""
    if override:
        if override not in CLOUDFLARE_MODEL_TYPES:
            raise RegistryError(
                f"model_type {override!r} is not one Cloudflare accepts ({', '.join(CLOUDFLARE_MODEL_TYPES)})"
            )
        return override
    if config.get("model_type") in CLOUDFLARE_MODEL_TYPES:
        return config["model_type"]
    base_dir = local_base_dir(av.base_model)
    if base_dir is not None:
        mt = base_model_type(base_dir)
        if mt in CLOUDFLARE_MODEL_TYPES:
            return mt
        raise RegistryError(
            f"{av.ref}: its base '{av.base_model}' is a '{mt}' model; Cloudflare accepts LoRAs for "
            f"{', '.join(CLOUDFLARE_MODEL_TYPES)} bases only"
        )
    spec = (av.base_model or config.get("base_model_name_or_path") or "").lower()
    for mt in CLOUDFLARE_MODEL_TYPES:
        if mt in spec:
            return mt
    raise RegistryError(
        f"{av.ref}: cannot tell the base model's type from '{av.base_model}'; pass --model-type mistral|llama|gemma"
    )


def cloudflare_problems(info: AdapterInfo, weights_bytes: int) -> list[str]:
    """Why Cloudflare would refuse this adapter (empty: it takes it); ``weights_bytes`` is the
    size of its safetensors file."""
    reasons = []
    if info.rank > CLOUDFLARE_MAX_RANK:
        reasons.append(f"rank {info.rank} is over Cloudflare's limit of {CLOUDFLARE_MAX_RANK}")
    if weights_bytes >= CLOUDFLARE_MAX_BYTES:
        reasons.append(f"{WEIGHTS_FILE} is {weights_bytes / 1e6:.1f} MB; Cloudflare takes files under 300 MB")
    extras = [k for k in ("modules_to_save", "embedding", "lm_head", "dora", "bias") if info.flags[k]]
    if extras:
        reasons.append(f"it has extra modules/features Cloudflare does not accept: {', '.join(extras)}")
    return reasons


def vllm_problems(info: AdapterInfo) -> list[str]:
    """Why vLLM would refuse this adapter (empty: it serves it with some ``--max-lora-rank``)."""
    reasons = []
    if info.flags["modules_to_save"]:
        reasons.append("it saves whole modules (modules_to_save), which vLLM refuses")
    if info.flags["dora"]:
        reasons.append("it uses DoRA, which vLLM refuses")
    if info.rank > VLLM_RANKS[-1]:
        reasons.append(f"rank {info.rank} is over vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")
    return reasons


def export_adapter(
    registry: Registry,
    ref: str,
    dest: Path | str,
    target: str = "peft",
    model_type: str | None = None,
) -> ExportResult:
    """Write the adapter ``ref`` into the new directory ``dest`` in ``target``'s format.

    ``peft`` copies the two stored files; ``cloudflare`` also adds ``model_type`` to the config
    and refuses adapters Cloudflare would reject; ``vllm`` refuses what vLLM refuses and returns
    the command-line flags that serve it; ``gguf`` writes one llama.cpp LoRA file (``dest`` is
    that file, or an existing directory to put ``NAME-vVERSION.gguf`` in).
    """
    if target not in TARGETS:
        raise RegistryError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    av = registry.resolve(ref)
    src = registry.adapter_path(av.id)
    dest = Path(dest)
    info = validate_adapter_dir(src)  # headers only: flags and per-module ranks of the stored files
    if target == "gguf":
        return _export_gguf(av, src, info, dest)
    notes: list[str] = []
    files: dict[str, bytes | Path] = {CONFIG_FILE: src / CONFIG_FILE, WEIGHTS_FILE: src / WEIGHTS_FILE}

    if target == "cloudflare":
        reasons = cloudflare_problems(info, (src / WEIGHTS_FILE).stat().st_size)
        if reasons:
            raise RegistryError(f"cannot export {av.ref} for Cloudflare: " + "; ".join(reasons))
        config = json.loads((src / CONFIG_FILE).read_text())
        config["model_type"] = cloudflare_model_type(av, config, model_type)
        files[CONFIG_FILE] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        notes.append(
            f"upload with: npx wrangler ai finetune create <model> {av.name} {dest}  "
            f"(model_type={config['model_type']})"
        )
    elif target == "vllm":
        reasons = vllm_problems(info)
        if reasons:
            raise RegistryError(f"cannot export {av.ref} for vLLM: " + "; ".join(reasons))
        notes.extend(_vllm_notes(av, info, dest))

    _write_dir(dest, files)
    return ExportResult(path=dest, target=target, notes=notes)


def _vllm_notes(av: AdapterVersion, info: AdapterInfo, dest: Path) -> list[str]:
    """What to know to serve the export with vLLM, ending with the command line."""
    notes = []
    max_rank = next(r for r in VLLM_RANKS if r >= info.rank)
    if info.flags["bias"]:
        notes.append("the adapter trains biases: start vLLM with --enable-lora-bias")
    if info.flags["embedding"]:
        notes.append("the adapter adapts embeddings: its vocabulary must equal the base's")
    flags_line = f"--enable-lora --lora-modules {av.name}={dest.resolve()}"
    if max_rank > VLLM_DEFAULT_MAX_RANK:
        flags_line += f" --max-lora-rank {max_rank}"
    notes.append(f"vllm serve {av.base_model or '<base model>'} {flags_line}")
    return notes


def _export_gguf(av: AdapterVersion, src: Path, info: AdapterInfo, dest: Path) -> ExportResult:
    """``export_adapter(..., target="gguf")``: one GGUF LoRA file for llama.cpp."""
    config = gguf.base_config(av)
    reasons = gguf.gguf_problems(info, config)
    if reasons:
        fix = ""
        if config is None:
            fix = f" (download it, e.g. `huggingface-cli download {av.base_model or 'BASE'}`, and retry)"
        raise gguf.GgufExportError(f"cannot export {av.ref} as GGUF: " + "; ".join(reasons) + fix)
    if dest.is_dir():
        dest = dest / f"{av.name}-v{av.version}{gguf.SUFFIX}"
    if dest.exists():
        raise RegistryError(f"'{dest}' exists; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_gguf(src, config, dest, alpha=info.alpha, name=av.ref, base=av.base_model)
    base = av.base_model or "the base model"
    notes = [f"serve with llama.cpp: llama-server -m BASE.gguf --lora {dest}  (BASE.gguf: {base} in GGUF)"]
    return ExportResult(path=dest, target="gguf", notes=notes)


# -- archives ----------------------------------------------------------------------------------


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes | Path) -> None:
    """Add a member with fixed metadata so the same version always gives the same archive bytes."""
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
    if isinstance(data, Path):
        info.size = data.stat().st_size
        with open(data, "rb") as fh:
            tar.addfile(info, fh)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def export_archive(registry: Registry, ref: str, dest: Path | str) -> ExportResult:
    """Write ``ref`` as a ``.tar.gz`` (manifest + the two files) that ``import_archive`` restores bit for bit.

    ``dest`` is the archive path, or an existing directory to put ``NAME-vVERSION.tar.gz`` in.
    """
    av = registry.resolve(ref)
    src = registry.adapter_path(av.id)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / f"{av.name}-v{av.version}.tar.gz"
    if dest.exists():
        raise RegistryError(f"'{dest}' exists; refusing to overwrite it")
    manifest = {"format": ARCHIVE_FORMAT, "adapter": av.to_dict()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _tar_add(tar, MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
                for fname in STORED_FILES:
                    _tar_add(tar, fname, src / fname)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path=dest, target="archive", notes=[])


def import_archive(registry: Registry, archive: Path | str, name: str | None = None) -> AdapterVersion:
    """Register the adapter in a ``lora-kit adapters export --archive`` file as a new version.

    Members are read one by one (never ``extractall``): only the manifest and the two adapter
    files are accepted, so an archive cannot write outside the registry or smuggle in pickles.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise RegistryError(f"no archive at '{archive}'")
    stage = registry.root / "tmp" / f"import-{os.getpid()}-{uuid.uuid4().hex}"
    stage.mkdir(parents=True)
    try:
        manifest = None
        meta: dict | None = None
        seen: set[str] = set()
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                for member in tar:
                    if member.name.lower().endswith(PICKLE_SUFFIXES):
                        raise InvalidAdapter(
                            f"archive member {member.name!r} refused: pickle files can run arbitrary code when loaded"
                        )
                    if not member.isfile() or member.name not in (MANIFEST, *STORED_FILES):
                        raise InvalidAdapter(
                            f"archive member {member.name!r} refused: a lora-kit archive holds only "
                            f"{MANIFEST}, {', '.join(STORED_FILES)}"
                        )
                    if member.name in seen:
                        raise InvalidAdapter(f"archive member {member.name!r} appears twice")
                    seen.add(member.name)
                    fh = tar.extractfile(member)
                    assert fh is not None
                    if member.name == MANIFEST:
                        if member.size > _MAX_MANIFEST_BYTES:
                            raise InvalidAdapter(f"{MANIFEST} is implausibly large ({member.size} bytes)")
                        manifest = json.loads(_read_capped(fh, _MAX_MANIFEST_BYTES, MANIFEST))
                        meta = _check_manifest(manifest, archive)
                    else:
                        # Exported archives put the manifest first: its sizes cap the files.
                        cap = MAX_MEMBER_BYTES
                        if meta is not None:
                            cap = min(cap, meta["files"][member.name]["size"])
                        if member.size > cap:
                            raise InvalidAdapter(
                                f"archive member {member.name!r} refused: it holds {member.size} bytes, "
                                f"more than {'its manifest declares' if meta is not None else 'the limit'} ({cap})"
                            )
                        with open(stage / member.name, "wb") as out:
                            _copy_capped(fh, out, cap, member.name)
        except InvalidAdapter:
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError) as err:
            # ValueError: JSON (JSONDecodeError, bad UTF-8) and zlib; RecursionError: a nested manifest.
            raise InvalidAdapter(f"'{archive}' is not a readable lora-kit archive: {err}") from None
        if meta is None:
            raise InvalidAdapter(f"'{archive}' has no valid {MANIFEST} (format {ARCHIVE_FORMAT})")
        for fname in STORED_FILES:
            if not (stage / fname).is_file():
                raise InvalidAdapter(f"'{archive}' lacks {fname}")
            expected = meta["files"][fname]["sha256"]
            if (stage / fname).stat().st_size != meta["files"][fname]["size"]:
                raise InvalidAdapter(
                    f"'{archive}': {fname} has {(stage / fname).stat().st_size} bytes, the manifest says "
                    f"{meta['files'][fname]['size']} (corrupted)"
                )
            got = sha256_file(stage / fname)
            if got != expected:
                raise InvalidAdapter(
                    f"'{archive}': {fname} has sha256 {got[:16]}..., the manifest says {expected[:16]}... (corrupted)"
                )
        lineage = dict(meta.get("lineage") or {})
        lineage["imported_from"] = {
            "id": meta.get("id"),
            "ref": meta.get("ref"),
            "archive": archive.name,
            "created_at": meta.get("created_at"),
        }
        return registry.register(
            stage,
            name or meta["name"],
            base_model=meta.get("base_model"),
            description=meta.get("description") or "",
            tags=meta.get("tags") or [],
            lineage=lineage,
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _read_capped(fh: Any, cap: int, what: str) -> bytes:
    buf = io.BytesIO()
    _copy_capped(fh, buf, cap, what)
    return buf.getvalue()


def _copy_capped(fh: Any, out: Any, cap: int, what: str) -> None:
    """Copy ``fh`` to ``out`` in 1 MiB chunks; InvalidAdapter as soon as it exceeds ``cap`` bytes."""
    total = 0
    while chunk := fh.read(1 << 20):
        total += len(chunk)
        if total > cap:
            raise InvalidAdapter(f"archive member {what!r} refused: it holds more than {cap} bytes")
        out.write(chunk)


def _check_manifest(manifest: Any, archive: Path) -> dict:
    """The manifest's ``adapter`` object, checked field by field; InvalidAdapter naming the bad field."""

    def bad(why: str) -> InvalidAdapter:
        return InvalidAdapter(f"'{archive}' has a malformed {MANIFEST}: {why}")

    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise bad(f'expected a JSON object with "format": {ARCHIVE_FORMAT}')
    meta = manifest.get("adapter")
    if not isinstance(meta, dict):
        raise bad("'adapter' must be an object")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise bad("'adapter.files' must be an object")
    for fname in STORED_FILES:
        entry = files.get(fname)
        if not isinstance(entry, dict):
            raise bad(f"'adapter.files' has no entry for {fname}")
        sha, size = entry.get("sha256"), entry.get("size")
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _SHA256_CHARS):
            raise bad(f"'adapter.files.{fname}.sha256' must be 64 hex digits")
        if type(size) is not int or not 0 <= size <= MAX_MEMBER_BYTES:
            raise bad(f"'adapter.files.{fname}.size' must be a byte count up to {MAX_MEMBER_BYTES}")
    for key, kind in (("name", str), ("description", str), ("base_model", str), ("lineage", dict), ("tags", list)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise bad(f"'adapter.{key}' must be a {'string' if kind is str else kind.__name__}")
    for key in ("id", "ref", "created_at"):
        if meta.get(key) is not None and not isinstance(meta[key], (str, int)):
            raise bad(f"'adapter.{key}' must be a string")
    if not isinstance(meta.get("name"), str):
        raise bad("'adapter.name' must be a string")
    return meta
