"""Validate a PEFT LoRA adapter directory before it enters the registry.

Everything here reads JSON and safetensors *headers* (no torch, no model load), plus one pass
over the adapter's own weight bytes (memory-mapped, numpy) for NaN/inf values, so checking an
adapter against a 7B base stays fast. Problems that make an adapter unusable (an inconsistent
header, non-finite weights, an absurd scale) raise ``InvalidAdapter``; properties that limit
where it can be served (whole saved modules, embedding LoRA, DoRA, a rank above the engine's
default limit) become warnings on the registered version.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_kit.adapters.format import (
    ADAPTER_FILES,
    CONFIG_FILE,
    DTYPE_SIZES,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    InvalidAdapter,
    config_alpha,
    decode_json,
    missing_files,
    module_rank,
    parse_config,
    parse_tensor_name,
    pickle_files,
    rank_warning,
    scale_problems,
    targets_module,
    unservable_reasons,
)

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass
class AdapterInfo:
    """What validation learned about an adapter directory."""

    config: dict[str, Any]
    rank: int  # the largest rank of any module (config ``r`` unless rank_pattern raises it)
    alpha: float
    target_modules: list[str]
    modules: dict[str, dict[str, Any]]  # module path (base-model naming) -> {"kind", "A", "B", "rank"}
    saved_modules: list[str]  # tensors saved whole (modules_to_save, trainable tokens)
    saved_shapes: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)

    @property
    def flags(self) -> dict[str, bool]:
        """Features multi-adapter servers (vLLM, Cloudflare, batched PEFT) cannot serve."""
        return {
            "modules_to_save": bool(self.saved_modules or self.config.get("modules_to_save")),
            "embedding": any(m["kind"] == "embedding" for m in self.modules.values()),
            "lm_head": any(p.split(".")[-1] == "lm_head" for p in list(self.modules) + self.saved_modules),
            "dora": bool(self.config.get("use_dora")),
            "bias": self.config.get("bias", "none") not in (None, "none") or bool(self.config.get("lora_bias")),
        }


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "offsets"} from a safetensors file's header, checking it
    is well formed: each tensor's shape x dtype size equals its byte range, and the ranges tile
    the file's data exactly (which catches truncated files and headers that lie about shapes).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidAdapter(f"{path.name}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise InvalidAdapter(f"{path.name}: not a safetensors file (header length {n} > file size)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidAdapter(f"{path.name}: the safetensors header is not valid JSON ({err})") from None
    except RecursionError:
        raise InvalidAdapter(f"{path.name}: the safetensors header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{path.name}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    tensors: dict[str, dict[str, Any]] = {}
    data = size - 8 - n
    ranges: list[tuple[int, int, str]] = []
    for name, meta in header.items():
        try:
            dtype, shape, (start, stop) = meta["dtype"], [int(d) for d in meta["shape"]], meta["data_offsets"]
            start, stop = _offset(start), _offset(stop)
        except (KeyError, TypeError, ValueError):
            raise InvalidAdapter(f"{path.name}: malformed header entry for tensor '{name}'") from None
        if any(d < 0 for d in shape) or stop < start:
            raise InvalidAdapter(f"{path.name}: tensor '{name}' has a negative shape {shape} or byte range")
        # (a dtype this table does not know, e.g. a sub-byte one of a base model, is sized by its range only)
        nbytes = math.prod(shape) * DTYPE_SIZES.get(dtype, 0)
        if dtype in DTYPE_SIZES and stop - start != nbytes:
            raise InvalidAdapter(
                f"{path.name}: tensor '{name}' claims shape {shape} of {dtype} ({nbytes} bytes) but its data "
                f"offsets [{start}, {stop}] hold {stop - start} bytes (inconsistent safetensors header)"
            )
        tensors[name] = {"dtype": dtype, "shape": shape, "offsets": (start, stop)}
        ranges.append((start, stop, name))
    end = 0
    for start, stop, name in sorted(ranges):
        if start != end:  # safetensors' own rule: the byte ranges tile the data, no gap, no overlap
            raise InvalidAdapter(f"{path.name}: tensor '{name}' data does not follow the previous tensor's bytes")
        end = stop
    if end != data:
        raise InvalidAdapter(
            f"{path.name}: the header describes {end} data bytes but the file holds {data} (truncated or padded file)"
        )
    return tensors


def _offset(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value


# Per float dtype: the unsigned view and the exponent bits, all set exactly for inf and NaN.
_EXPONENT = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000), "F64": ("<u8", 0x7FF << 52)}
_CHUNK = 1 << 22  # elements checked at a time (bounded temporary memory for big tensors)


def nonfinite_tensors(path: Path, tensors: dict[str, dict[str, Any]]) -> list[str]:
    """Names of the float tensors of a safetensors file (headers from read_safetensors_header)
    that hold a NaN or an infinity; the bytes are memory-mapped, never loaded whole."""
    import numpy as np

    path = Path(path)
    bad: list[str] = []
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    size = path.stat().st_size
    if size <= 8 + n:
        return bad
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    try:
        for name, meta in sorted(tensors.items()):
            if meta["dtype"] not in _EXPONENT:
                continue
            view, mask = _EXPONENT[meta["dtype"]]
            start, stop = meta["offsets"]
            values = data[start:stop].view(np.dtype(view))
            mask = np.array(mask, dtype=values.dtype)
            for i in range(0, values.size, _CHUNK):
                if np.any((values[i : i + _CHUNK] & mask) == mask):
                    bad.append(name)
                    break
    finally:
        del data
    return bad


def check_files(adapter_dir: Path) -> list[str]:
    """Refuse pickle files and missing files; return the names of other files, which are ignored."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InvalidAdapter(f"'{adapter_dir}' is not a directory (expected a PEFT adapter directory)")
    names = sorted(p.name for p in adapter_dir.iterdir())
    pickles = pickle_files(names)
    if pickles:
        raise InvalidAdapter(
            f"refusing {', '.join(pickles)} in '{adapter_dir}': pickle files can run arbitrary code when loaded. "
            f"Save the adapter with safetensors (PEFT: save_pretrained(..., safe_serialization=True)) "
            f"so the directory holds {CONFIG_FILE} + {WEIGHTS_FILE}"
        )
    missing = missing_files(adapter_dir)
    if missing:
        raise InvalidAdapter(
            f"'{adapter_dir}' is missing {', '.join(missing)} (a PEFT LoRA adapter needs {' + '.join(ADAPTER_FILES)})"
        )
    return [n for n in names if n not in ADAPTER_FILES]


def validate_adapter_dir(adapter_dir: Path, base_dir: Path | None = None) -> AdapterInfo:
    """Validate a PEFT LoRA directory (and, when ``base_dir`` is given, check it against that base)."""
    adapter_dir = Path(adapter_dir)
    ignored = check_files(adapter_dir)
    config = parse_config(adapter_dir / CONFIG_FILE)
    tensors = read_safetensors_header(adapter_dir / WEIGHTS_FILE)
    if not tensors:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no tensors")
    modules, saved, problems = _group_tensors(tensors)
    problems += _check_modules(modules, config)
    problems += scale_problems(config, sorted(modules))
    problems += [
        f"tensor {name} holds NaN or infinite values" for name in nonfinite_tensors(adapter_dir / WEIGHTS_FILE, tensors)
    ]
    if problems:
        raise InvalidAdapter("invalid adapter in '{}':\n  - {}".format(adapter_dir, "\n  - ".join(problems[:20])))
    targets = config["target_modules"]
    info = AdapterInfo(
        config=config,
        rank=max(m["rank"] for m in modules.values()),
        alpha=config_alpha(config),
        target_modules=[targets] if isinstance(targets, str) else sorted(targets),
        modules=modules,
        saved_modules=saved,
        saved_shapes={
            p: tensors[PEFT_PREFIX + p]["shape"] if PEFT_PREFIX + p in tensors else tensors[p]["shape"] for p in saved
        },
        ignored_files=ignored,
    )
    info.warnings.extend(_warnings(info))
    if base_dir is not None:
        check_against_base(info, Path(base_dir))
    return info


def _group_tensors(tensors: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """Tensor headers -> (module -> {"kind", "A", "B", "dora"} shapes, tensors saved whole, problems)."""
    modules: dict[str, dict[str, Any]] = {}
    saved: list[str] = []
    problems: list[str] = []
    for name, meta in sorted(tensors.items()):
        if meta["dtype"] not in FLOAT_DTYPES:
            problems.append(f"tensor {name} has dtype {meta['dtype']}; LoRA weights must be floating point")
        key = parse_tensor_name(name)
        if key is None:
            saved.append(name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name)
            continue
        entry = modules.setdefault(key.module, {"kind": key.kind})
        if key.kind == "dora":
            entry["dora"] = meta["shape"]
        else:
            entry["kind"] = key.kind
            entry[key.part] = meta["shape"]
    if not modules:
        problems.append(f"{WEIGHTS_FILE} holds no LoRA weights (lora_A/lora_B tensors)")
    return modules, saved, problems


def _check_modules(modules: dict[str, dict[str, Any]], config: dict[str, Any]) -> list[str]:
    """Each module has A and B, 2-D, of the config's rank for it, and is a target; sets ``rank``."""
    problems: list[str] = []
    targets = config["target_modules"]
    for module, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            have, lacks = ("A", "B") if "A" in entry else ("B", "A")
            problems.append(f"{module}: has lora_{have} but not lora_{lacks}")
            continue
        a, b = entry["A"], entry["B"]
        rank = entry["rank"] = module_rank(config, module)
        if len(a) != 2 or len(b) != 2:
            problems.append(f"{module}: LoRA tensors must be 2-D, got A{a} B{b}")
            continue
        # linear: A is (r, in), B is (out, r); embedding: A is (r, num_embeddings), B is (dim, r)
        if a[0] != rank or b[1] != rank:
            problems.append(f"{module}: shapes A{a} B{b} do not match rank {rank} from {CONFIG_FILE}")
        if not targets_module(targets, module):
            problems.append(f"{module}: has LoRA weights but is not in target_modules {targets}")
    return problems


def _warnings(info: AdapterInfo) -> list[str]:
    """What limits where a valid adapter can be served."""
    config, targets, out = info.config, info.config["target_modules"], []
    if isinstance(targets, list):
        unused = [t for t in targets if not any(m == t or m.endswith("." + t) for m in info.modules)]
        if unused:
            out.append(f"target_modules {unused} have no weights in {WEIGHTS_FILE}")
    flags = info.flags
    if flags["modules_to_save"]:
        what = ", ".join(info.saved_modules or config.get("modules_to_save") or [])
        out.append(
            f"saves whole modules ({what}): multi-adapter servers (vLLM, Cloudflare, lora-kit batching) cannot batch it with other adapters"
        )
    if flags["embedding"]:
        out.append("adapts the embedding layer: not accepted by Cloudflare; vLLM needs an equal vocabulary size")
    if flags["lm_head"] and not flags["modules_to_save"]:
        out.append("adapts lm_head: multi-adapter servers may refuse it")
    if flags["dora"]:
        out.append("uses DoRA (use_dora): vLLM and Cloudflare do not serve DoRA adapters")
    out.extend(f"lora-kit serve cannot load it: {why}" for why in unservable_reasons(config))
    rank = rank_warning(info.rank)
    if rank:
        out.append(rank)
    return out


# -- the base model ----------------------------------------------------------------------------


def read_base_json(base_dir: Path, fname: str) -> Any:
    """A JSON file of a local base model (``config.json``, the weight index): InvalidAdapter naming
    the base and the file when it is not UTF-8, not JSON, or nested too deeply to parse."""
    where = f"base model '{base_dir}': {fname}"
    try:
        raw = (Path(base_dir) / fname).read_bytes()
    except OSError as err:
        raise InvalidAdapter(f"{where} cannot be read ({err.strerror})") from None
    return decode_json(raw, where)


def base_weight_shapes(base_dir: Path) -> dict[str, list[int]]:
    """Parameter name -> shape of a local Hugging Face model, from its safetensors headers only."""
    base_dir = Path(base_dir)
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        data = read_base_json(base_dir, index.name)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InvalidAdapter(f"base model '{base_dir}': {index.name} has no 'weight_map' of file names")
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    if not shards:
        raise InvalidAdapter(f"base model '{base_dir}' has no .safetensors weights to check the adapter against")
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        for name, meta in read_safetensors_header(base_dir / shard).items():
            shapes[name] = meta["shape"]
    return shapes


def check_against_base(info: AdapterInfo, base_dir: Path) -> None:
    """Every adapted module exists in the base and its LoRA shapes fit the base's dimensions."""
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise InvalidAdapter(f"base model '{base_dir}' has no config.json")
    base_config = read_base_json(base_dir, "config.json")
    if not isinstance(base_config, dict):
        raise InvalidAdapter(f"base model '{base_dir}': config.json must hold a JSON object")
    if base_config.get("quantization_config"):
        # Packed 4-bit weights have other shapes; the module names can still be checked.
        info.warnings.append(f"base '{base_dir}' is stored quantized: module names checked, shapes not")
    quantized = bool(base_config.get("quantization_config"))
    shapes = base_weight_shapes(base_dir)
    base_modules = {n[: -len(".weight")] for n in shapes if n.endswith(".weight")}
    tied = base_config.get("tie_word_embeddings", False)
    problems: list[str] = []

    targets = info.config.get("target_modules")
    if isinstance(targets, list):
        for target in targets:
            if not any(m == target or m.endswith("." + target) for m in base_modules) and not (
                target == "lm_head" and tied
            ):
                problems.append(f"target module '{target}' does not exist in the base model")

    for module, entry in sorted(info.modules.items()):
        weight = f"{module}.weight"
        if weight not in shapes and module.endswith("lm_head") and tied:
            weight = next((n for n in shapes if n.endswith("embed_tokens.weight")), weight)
        if weight not in shapes:
            problems.append(f"{module}: no such module in the base model")
            continue
        if quantized:
            continue
        w, a, b = shapes[weight], entry["A"], entry["B"]
        if len(w) != 2:
            problems.append(f"{module}: base weight has shape {w}; LoRA needs a 2-D weight")
        elif entry["kind"] == "linear" and (a[1] != w[1] or b[0] != w[0]):
            problems.append(f"{module}: LoRA A{a} B{b} do not fit the base weight {w} (out, in)")
        elif entry["kind"] == "embedding" and (a[1] != w[0] or b[0] != w[1]):
            problems.append(f"{module}: embedding LoRA A{a} B{b} do not fit the base embedding {w}")
    for path in info.saved_modules:
        # a saved whole module replaces the base tensor of the same name, so the shapes must agree
        if path in shapes:
            if not quantized and shapes[path] != info.saved_shapes.get(path, shapes[path]):
                problems.append(
                    f"saved module tensor {path} has shape {info.saved_shapes[path]}, the base has {shapes[path]}"
                )
        elif not any(path.startswith(m + ".") for m in base_modules):
            problems.append(f"saved module tensor {path} has no counterpart in the base model")
    if problems:
        raise InvalidAdapter(
            "adapter does not fit the base model '{}':\n  - {}".format(base_dir, "\n  - ".join(problems[:20]))
        )


def base_model_type(base_dir: Path) -> str | None:
    """The ``model_type`` in a local base's config.json, if any."""
    path = Path(base_dir) / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_bytes())
        except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deeply
            return None
        return config.get("model_type") if isinstance(config, dict) else None
    return None
