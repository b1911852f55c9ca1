"""Read a PEFT LoRA adapter directory (safetensors only) and check it fits the base model.

The result maps each base module path (``model.layers.0.self_attn.q_proj``) to its
``A`` (r, in) and ``B`` (out, r) matrices, with the LoRA scale folded into ``B`` so the
batched forward needs one product less per module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_kit.adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    InvalidAdapter,
    missing_files,
    module_scale,
    parse_config,
    parse_tensor_name,
    unservable_reasons,
)
from lora_kit.engine.types import AdapterError, UnknownAdapter

if TYPE_CHECKING:
    import torch

Resolver = Callable[[str], tuple[str, Path]]


@dataclass
class AdapterWeights:
    """A LoRA adapter ready to be copied into a slot."""

    key: str  # canonical reference (e.g. ``name@3``)
    path: Path
    rank: int  # the largest rank over its modules
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), scale * B (out, r))

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def read_config(path: Path) -> dict:
    """The adapter's ``adapter_config.json``, checked to be a plain LoRA this engine can serve."""
    if missing_files(path):
        raise AdapterError(f"{path} is not a PEFT adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = parse_config(path / CONFIG_FILE)
    except InvalidAdapter as err:
        raise AdapterError(f"{path}: {err}") from None
    reasons = unservable_reasons(config)
    if reasons:
        raise AdapterError(f"{path}: {reasons[0]}")
    return config


def load_adapter(
    key: str,
    path: Path,
    base_shapes: Mapping[str, tuple[int, int]],
    dtype: torch.dtype,
    device: torch.device,
    max_rank: int,
) -> AdapterWeights:
    """Load and validate an adapter against ``base_shapes`` (module path -> (in, out) of the base)."""
    path = Path(path)
    config = read_config(path)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in sorted(_read_pairs(path).items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: module '{module}' has lora_A without lora_B or the reverse")
        if module not in base_shapes:
            raise AdapterError(
                f"{path}: the adapter targets '{module}', which is not a linear layer of this base model"
            )
        _check_shapes(path, module, ab["A"], ab["B"], base_shapes[module], max_rank)
        modules[module] = _scaled(path, module, ab["A"], ab["B"], module_scale(config, module), dtype, device)
    return AdapterWeights(key=key, path=path, rank=max(a.shape[0] for a, _ in modules.values()), modules=modules)


def _read_pairs(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's tensors: module path -> {"A": lora_A, "B": lora_B}."""
    from safetensors import safe_open

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            for name in f.keys():
                key = parse_tensor_name(name)
                if key is None or key.kind != "linear":
                    raise AdapterError(
                        f"{path}: weight '{name}' is not a LoRA A/B matrix of a linear layer "
                        "(embedding/lm_head/DoRA weights cannot be served)"
                    )
                pairs.setdefault(key.module, {})[key.part] = f.get_tensor(name)
    except AdapterError:
        raise
    except Exception as err:  # a corrupt or truncated file is this adapter's problem, not the server's
        raise AdapterError(f"{path}: cannot read {WEIGHTS_FILE}: {err}") from err
    if not pairs:
        raise AdapterError(f"{path}: the adapter has no LoRA weights")
    return pairs


def _check_shapes(
    path: Path, module: str, a: torch.Tensor, b: torch.Tensor, base: tuple[int, int], max_rank: int
) -> None:
    """``a`` (r, in) and ``b`` (out, r) must fit the base layer ``base`` = (in, out), r <= ``max_rank``."""
    fan_in, fan_out = base
    rank = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, rank):
        raise AdapterError(
            f"{path}: '{module}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the base layer is "
            f"{fan_in} -> {fan_out} (was the adapter trained on another base model?)"
        )
    if rank > max_rank:
        raise AdapterError(f"{path}: rank {rank} of '{module}' exceeds the engine's max rank {max_rank}")


def _scaled(
    path: Path, module: str, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``scale * b`` in ``dtype`` on ``device`` (the scale folded in, in float64)."""
    import torch

    a_c = a.to(device=device, dtype=dtype).contiguous()
    b_c = (b.double() * scale).to(device=device, dtype=dtype).contiguous()
    # A NaN/inf weight turns every logit of a row on this adapter into NaN, which no
    # sampler can decode: refuse it at load time with a clear error, for this adapter only.
    if not (torch.isfinite(a_c).all() and torch.isfinite(b_c).all()):
        raise AdapterError(f"{path}: '{module}' has NaN or infinite weights (after scaling to {dtype})")
    return a_c, b_c


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
