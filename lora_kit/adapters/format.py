"""The PEFT LoRA adapter format: the one place that knows its files, keys and config.

An adapter is a directory with exactly two files that matter::

    adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight  (r, in)
                               base_model.model.<module>.lora_B.weight  (out, r)

Everything else (the registry, the engine, the server's fine-tune uploads, exports) asks
this module: which files, how a tensor name splits into module and part, the rank and
scale of a module (``rank_pattern``/``alpha_pattern``/``use_rslora``), and which config
features a batched multi-adapter server cannot serve.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_kit.errors import LoraKitError, not_utf8

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Suffixes of files that hold pickles, which can run arbitrary code when loaded: refused everywhere.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PEFT_PREFIX = "base_model.model."
# PEFT's LoraConfig default, used when a config omits lora_alpha (so PEFT and lora-kit agree).
PEFT_DEFAULT_ALPHA = 8
# The largest LoRA rank ``lora-kit serve`` loads by default (EngineConfig.max_rank); the registry
# warns about a higher rank, which needs ``serve --max-rank``.
MAX_RANK = 256
# The largest LoRA scale (alpha / r, or alpha / sqrt(r) with rsLoRA) accepted: trainers use
# scales of about 0.1 to 100, and ``scale * B`` past this bound overflows half precision.
MAX_SCALE = 1e4
# Bytes per element of the safetensors dtypes (its header must agree with its byte ranges).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# Config features the batched LoRA forward cannot serve, with the reason shown to the user.
# The registry accepts such adapters (with a warning: other servers or a merge may use them);
# the engine refuses them when loading.
UNSERVABLE = {
    "use_dora": "DoRA adapters are not supported by the batched LoRA forward",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters are not supported",
    "modules_to_save": "adapters with modules_to_save (full copies of layers) cannot share one base",
    "target_parameters": "target_parameters adapters are not supported",
    "lora_bias": "adapters with a LoRA bias are not supported",
}

# PEFT saves ``<module>.lora_A.weight``; some writers keep the adapter name (``lora_A.default.weight``).
_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<linear>lora_[AB])(?:\.[^.]+)?\.weight|(?P<embedding>lora_embedding_[AB])(?:\.[^.]+)?"
    r"|(?P<dora>lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?)$"
)


class InvalidAdapter(LoraKitError, ValueError):
    """An adapter directory, config or archive is not a valid, safe PEFT LoRA adapter."""


@dataclass(frozen=True)
class TensorKey:
    """What a tensor name of ``adapter_model.safetensors`` stands for."""

    module: str  # module path in the base model's naming, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear", "embedding" or "dora"
    part: str  # "A", "B" or "m" (DoRA magnitude)


def parse_tensor_name(name: str) -> TensorKey | None:
    """Split a PEFT tensor name into module, kind and part; None for a tensor saved whole.

    >>> parse_tensor_name("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight")
    TensorKey(module='model.layers.0.mlp.up_proj', kind='linear', part='A')
    """
    path = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
    m = _KEY.match(path)
    if m is None:
        return None
    if m["linear"]:
        return TensorKey(m["module"], "linear", m["linear"][-1])
    if m["embedding"]:
        return TensorKey(m["module"], "embedding", m["embedding"][-1])
    return TensorKey(m["module"], "dora", "m")


def pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key is a regex matched against the
    end of the module path (on a dot boundary); the first match wins, else ``default``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_rank(config: Mapping[str, Any], module: str) -> int:
    """The LoRA rank of ``module``: ``rank_pattern`` if it matches, else ``r``."""
    return int(pattern_value(config.get("rank_pattern"), module, config["r"]))


def config_alpha(config: Mapping[str, Any]) -> float:
    """``lora_alpha``, or PEFT's default when the config omits it."""
    return float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA))


def module_scale(config: Mapping[str, Any], module: str) -> float:
    """The factor PEFT multiplies ``B @ A`` by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    rank = module_rank(config, module)
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config_alpha(config)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def targets_module(targets: Any, module: str) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches the name or a dotted suffix."""
    if targets in (None, "all-linear"):
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def decode_json(raw: bytes | str, where: str) -> Any:
    """``raw`` parsed as JSON; InvalidAdapter naming ``where`` when it is not UTF-8, not JSON, or
    nested too deeply to parse (a user's file: one error line, never a traceback)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as err:
        raise InvalidAdapter(f"{where} is not UTF-8 text ({not_utf8(err)})") from None
    except json.JSONDecodeError as err:
        raise InvalidAdapter(f"{where} is not valid JSON: {err}") from None
    except RecursionError:
        raise InvalidAdapter(f"{where} is not valid JSON: its brackets are nested too deeply") from None


def parse_config(raw: str | bytes | Path) -> dict[str, Any]:
    """``adapter_config.json`` (its text, or its path) checked to describe a LoRA adapter.

    Raises InvalidAdapter naming the field when it is not JSON, not LORA, or has a bad ``r``,
    ``lora_alpha`` or ``target_modules``.
    """
    if isinstance(raw, Path):
        try:
            raw = raw.read_bytes()
        except OSError as err:
            raise InvalidAdapter(f"cannot read {CONFIG_FILE}: {err.strerror}") from None
    config = decode_json(raw, CONFIG_FILE)
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InvalidAdapter(f"{CONFIG_FILE}: peft_type is {peft_type!r}; only LORA adapters are supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InvalidAdapter(f"{CONFIG_FILE}: 'r' (the LoRA rank) must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not _positive_number(alpha):
        raise InvalidAdapter(f"{CONFIG_FILE}: 'lora_alpha' must be a positive finite number, got {alpha!r}")
    for key, check, what in (
        ("rank_pattern", _positive_int, "positive integer ranks"),
        ("alpha_pattern", _positive_number, "positive finite alphas"),
    ):
        pattern = config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and all(check(v) for v in pattern.values())):
            raise InvalidAdapter(f"{CONFIG_FILE}: '{key}' must map module patterns to {what}, got {pattern!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise InvalidAdapter(
            f"{CONFIG_FILE}: 'target_modules' must be a list of module names or a regex, got {targets!r}"
        )
    return config


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value: Any) -> bool:
    # json.loads reads NaN and Infinity: a config may hold them
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def scale_problems(config: Mapping[str, Any], modules: list[str]) -> list[str]:
    """Modules whose LoRA scale is not finite or above MAX_SCALE (empty: every scale can be served)."""
    problems = []
    for module in modules:
        try:
            scale = module_scale(config, module)
        except (OverflowError, ZeroDivisionError, ValueError, TypeError):
            scale = math.inf
        if not (math.isfinite(scale) and scale <= MAX_SCALE):
            problems.append(
                f"{module}: LoRA scale {scale:.3g} (lora_alpha / r) is not a finite number <= {MAX_SCALE:g}; "
                f"check lora_alpha in {CONFIG_FILE}"
            )
    return problems


def rank_warning(rank: int, max_rank: int = MAX_RANK) -> str | None:
    """The warning for a rank the engine refuses by default (None: it serves it)."""
    if rank <= max_rank:
        return None
    return f"lora-kit serve cannot load it with the default max rank {max_rank}: rank {rank} needs --max-rank {rank}"


def unservable_reasons(config: Mapping[str, Any]) -> list[str]:
    """Why the batched multi-adapter forward cannot serve this config (empty: it can)."""
    return [why for key, why in UNSERVABLE.items() if config.get(key)]


def missing_files(adapter_dir: Path) -> list[str]:
    """The adapter files ``adapter_dir`` lacks (empty: it has both)."""
    return [name for name in ADAPTER_FILES if not (Path(adapter_dir) / name).is_file()]


def pickle_files(names: list[str]) -> list[str]:
    """The names among ``names`` that hold pickles by their suffix."""
    return [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
