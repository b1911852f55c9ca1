"""Read a PEFT LoRA adapter directory (safetensors only) and check it fits the base model.

The result maps each base module path (``model.layers.0.self_attn.q_proj``) to its
``A`` (r, in) and ``B`` (out, r) matrices, with the LoRA scale folded into ``B`` so the
batched forward needs one product less per module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from lora_kit.engine.types import AdapterError, UnknownAdapter

if TYPE_CHECKING:
    import torch

# PEFT saves ``base_model.model.<module>.lora_A.weight``; a few writers keep the adapter name.
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

Resolver = Callable[[str], tuple[str, Path]]


@dataclass
class AdapterWeights:
    """A LoRA adapter ready to be copied into a slot."""

    key: str  # canonical reference (e.g. ``name@3``)
    path: Path
    rank: int  # the largest rank over its modules
    modules: dict[str, tuple["torch.Tensor", "torch.Tensor"]]  # module path -> (A (r, in), scale * B (out, r))

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path by its suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_config(path: Path) -> dict:
    """The adapter's ``adapter_config.json``, checked to be a plain LoRA this engine can serve."""
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file() or not (path / "adapter_model.safetensors").is_file():
        raise AdapterError(f"{path} is not a PEFT adapter directory (needs adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{cfg_file}: unreadable adapter config: {err}") from err
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters can be served, not {config.get('peft_type')}")
    refused = {
        "use_dora": "DoRA adapters are not supported by the batched LoRA forward",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters are not supported",
        "modules_to_save": "adapters with modules_to_save (full copies of layers) cannot share one base",
        "target_parameters": "target_parameters adapters are not supported",
        "lora_bias": "adapters with a LoRA bias are not supported",
    }
    for key, why in refused.items():
        if config.get(key):
            raise AdapterError(f"{path}: {why}")
    return config


def load_adapter(
    key: str,
    path: Path,
    base_shapes: Mapping[str, tuple[int, int]],
    dtype: "torch.dtype",
    device: "torch.device",
    max_rank: int,
) -> AdapterWeights:
    """Load and validate an adapter against ``base_shapes`` (module path -> (in, out) of the base)."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    config = read_config(path)
    pairs: dict[str, dict[str, "torch.Tensor"]] = {}
    try:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt", device="cpu") as f:
            for name in f.keys():
                m = _KEY.match(name)
                if m is None:
                    raise AdapterError(
                        f"{path}: weight '{name}' is not a LoRA A/B matrix of a linear layer "
                        "(embedding/lm_head/DoRA weights cannot be served)"
                    )
                pairs.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(name)
    except AdapterError:
        raise
    except Exception as err:  # a corrupt or truncated file is this adapter's problem, not the server's
        raise AdapterError(f"{path}: cannot read adapter_model.safetensors: {err}") from err
    if not pairs:
        raise AdapterError(f"{path}: the adapter has no LoRA weights")
    modules: dict[str, tuple["torch.Tensor", "torch.Tensor"]] = {}
    top_rank = 0
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: module '{module}' has lora_A without lora_B or the reverse")
        if module not in base_shapes:
            raise AdapterError(f"{path}: the adapter targets '{module}', which is not a linear layer of this base model")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = base_shapes[module]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, rank):
            raise AdapterError(
                f"{path}: '{module}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the base layer is "
                f"{fan_in} -> {fan_out} (was the adapter trained on another base model?)"
            )
        if rank > max_rank:
            raise AdapterError(f"{path}: rank {rank} of '{module}' exceeds the engine's max rank {max_rank}")
        scale = _scale(config, module, int(_pattern_value(config.get("rank_pattern") or {}, module, rank)))
        a_c = a.to(device=device, dtype=dtype).contiguous()
        b_c = (b.double() * scale).to(device=device, dtype=dtype).contiguous()
        # A NaN/inf weight turns every logit of a row on this adapter into NaN, which no
        # sampler can decode: refuse it at load time with a clear error, for this adapter only.
        if not (torch.isfinite(a_c).all() and torch.isfinite(b_c).all()):
            raise AdapterError(f"{path}: '{module}' has NaN or infinite weights (after scaling to {dtype})")
        modules[module] = (a_c, b_c)
        top_rank = max(top_rank, rank)
    return AdapterWeights(key=key, path=path, rank=top_rank, modules=modules)


def registry_resolver(root: Path | str | None = None) -> Resolver:
    """A resolver over the lora-kit registry: ref -> (canonical ``name@version``, adapter directory).

    The registry is opened on first use (not at engine start), and once.
    """
    opened: list = []

    def resolve(ref: str) -> tuple[str, Path]:
        from lora_kit import registry

        if not opened:
            opened.append(registry.Registry(Path(root) if root is not None else None))
        reg = opened[0]
        try:
            version = reg.resolve(ref)
            return version.ref, Path(reg.adapter_path(version.ref))
        except registry.RegistryError as err:  # not found, or not even a well-formed reference
            raise UnknownAdapter(str(err) or f"unknown adapter '{ref}'") from err

    return resolve


def mapping_resolver(adapters: Mapping[str, Path | str]) -> Resolver:
    """A resolver over a plain ``{name: directory}`` mapping (tests, benchmarks)."""

    def resolve(ref: str) -> tuple[str, Path]:
        if ref not in adapters:
            raise UnknownAdapter(f"unknown adapter '{ref}'")
        return ref, Path(adapters[ref])

    return resolve
