"""FSDP2 for QLoRA, applied by lora-kit itself (torchtune's way), the same code on CPU/gloo and GPU/NCCL.

accelerate (or torchrun) only launches the processes and sets up the process group; accelerate's
own FSDP refuses the CPU, so the trainer never lets it wrap the model. Here each decoder layer,
then the root, is sharded with ``torch.distributed.fsdp.fully_shard``: every parameter becomes a
``DTensor`` sharded on dim 0 across the ranks. The 4-bit base shards too because it is loaded
with a float ``bnb_4bit_quant_storage`` (its packed bytes stored as ``(n, 1)`` floats); each
``Linear4bit`` keeps its ``quant_state`` on the module, and bitsandbytes re-attaches it to the
all-gathered weight in ``forward``. LoRA parameters stay trainable, the base frozen.

Checkpoints stay safetensors: each rank saves its local shards (``DTensor.to_local()``), which
only fit the same world size (the trainer refuses another one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lora_kit.errors import LoraKitError


class ShardError(LoraKitError):
    """A model FSDP cannot shard, or a checkpoint shard that does not fit this model's shards."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the classes transformers never splits across devices: ``_no_split_modules``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ShardError(
            f"{type(base).__name__} names no decoder layer class (_no_split_modules) for FSDP to shard; "
            "train it with train.distributed: ddp"
        )
    return layers


def shard(model: nn.Module, device: torch.device) -> None:
    """Shard ``model`` in place across all ranks: every decoder layer as one FSDP unit, then the root.

    One unit per layer means a rank holds its shards plus at most two whole layers (the running one
    and the prefetched next), which is what makes the base fit across devices. The root unit
    (embeddings, lm_head) stays gathered from forward to backward (FSDP2's choice for the root).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear (not PEFT's LoRA wrapper of one, whose ``weight`` is its base layer's)."""
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")


def shard_sizes(model: nn.Module) -> dict[str, int]:
    """This rank's share of the model: bytes of the 4-bit base weights and count of trainable (LoRA)
    parameters, local (``*_local``) and in the whole model (``*_total``)."""
    sizes = {"base_4bit_bytes_local": 0, "base_4bit_bytes_total": 0, "lora_params_local": 0, "lora_params_total": 0}
    for module in model.modules():
        if _is_4bit(module):
            weight = module.weight
            sizes["base_4bit_bytes_local"] += _local(weight).numel() * weight.element_size()
            sizes["base_4bit_bytes_total"] += weight.numel() * weight.element_size()
    for param in model.parameters():
        if param.requires_grad:
            sizes["lora_params_local"] += _local(param).numel()
            sizes["lora_params_total"] += param.numel()
    return sizes


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Within: reduce-scatter gradients in backward only when ``sync`` (the last micro-batch of a
    step); earlier micro-batches accumulate unsharded gradients locally (FSDP2's ``no_sync``)."""
    model.set_requires_gradient_sync(sync)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the sharded gradients to a global norm of ``max_norm``; returns the norm before clipping
    (the same on every rank: the per-shard norms are reduced across ranks)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def local_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shards of the trainable parameters, by parameter name (plain CPU tensors)."""
    return {name: _local(p).detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_local_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy shards saved by :func:`local_lora_state` (same world size) back into the parameters."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state.keys():
        raise ShardError("the checkpoint's LoRA parameters are not this model's; start over with --fresh")
    for name, param in params.items():
        local = _local(param)
        if local.shape != state[name].shape:
            raise ShardError(
                f"{name}: checkpoint shard {tuple(state[name].shape)} != this rank's {tuple(local.shape)}; "
                "resume with the world size that wrote it, or start over with --fresh"
            )
        local.copy_(state[name])


def full_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) trainable parameters, by parameter name, on the CPU.

    A collective: every rank must call it. Gathers only the LoRA weights, never the base.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().cpu()
    return out


def local_state(obj: Any) -> Any:
    """A nested state (an optimizer's ``state_dict()``) with every DTensor replaced by its local shard."""
    if isinstance(obj, dict):
        return {k: local_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(local_state(v) for v in obj)
    return _local(obj) if isinstance(obj, torch.Tensor) else obj


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`local_state` for an optimizer: each per-parameter state tensor shaped like
    its parameter's local shard becomes a DTensor laid out like that parameter (scalars like
    AdamW's ``step`` stay plain tensors), ready for ``optimizer.load_state_dict``."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {"param_groups": state["param_groups"], "state": {}}
    for index, per_param in state["state"].items():
        param = params[int(index)]
        converted = {}
        for key, value in per_param.items():
            if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape != param.to_local().shape:
                    raise ShardError(f"optimizer state {key} of parameter {index}: the checkpoint shard does not fit")
                value = DTensor.from_local(
                    value.to(param.device),
                    param.device_mesh,
                    param.placements,
                    shape=param.shape,
                    stride=param.stride(),
                )
            converted[key] = value
        out["state"][index] = converted
    return out
