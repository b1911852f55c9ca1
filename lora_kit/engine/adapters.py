"""Read a PEFT LoRA adapter directory (safetensors only) and check it fits the base model.

The result maps each base module path (``model.layers.0.self_attn.q_proj``) to its
``A`` (r, in) and ``B`` (out, r) matrices, with the LoRA scale folded into ``B`` so the
batched forward needs one product less per module.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from lora_kit.engine.types import (
    AdapterError,
    EngineError,
    InvalidAdapterReference,
    ResolvedAdapter,
    UnknownAdapter,
)
from lora_kit.errors import hide_paths
from lora_kit.registry.lineage import sha256_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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


def read_config(path: Path, key: str | None = None) -> dict:
    """The adapter's ``adapter_config.json``, checked to be a plain LoRA this engine can serve.

    Errors name the adapter ``key`` (its reference) when given, never its directory: their
    messages reach HTTP clients, which must not learn the server's paths.
    """
    where = f"adapter '{key}'" if key is not None else str(path)
    if missing_files(path):
        raise AdapterError(f"{where} is not a PEFT adapter (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = parse_config(path / CONFIG_FILE)
    except InvalidAdapter as err:
        raise AdapterError(f"{where}: {hide_paths(str(err), (path,))}") from None
    reasons = unservable_reasons(config)
    if reasons:
        raise AdapterError(f"{where}: {reasons[0]}")
    return config


def load_adapter(
    key: str,
    path: Path,
    base_shapes: Mapping[str, tuple[int, int]],
    dtype: torch.dtype,
    device: torch.device,
    max_rank: int,
    files: Mapping[str, Mapping[str, Any]] | None = None,
) -> AdapterWeights:
    """Load and validate an adapter against ``base_shapes`` (module path -> (in, out) of the base).

    ``files`` (from the registry, see :class:`ResolvedAdapter`): the sha256 each file must have;
    a mismatch (a corrupted or edited file) is an AdapterError naming ``key``, and is logged."""
    path = Path(path)
    if files is not None:
        verify_files(key, path, files)
    config = read_config(path, key)
    where = f"adapter '{key}'"  # errors reach HTTP clients: the reference, never the directory
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in sorted(_read_pairs(path, where).items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: module '{module}' has lora_A without lora_B or the reverse")
        if module not in base_shapes:
            raise AdapterError(
                f"{where}: the adapter targets '{module}', which is not a linear layer of this base model"
            )
        _check_shapes(where, module, ab["A"], ab["B"], base_shapes[module], max_rank)
        modules[module] = _scaled(where, module, ab["A"], ab["B"], module_scale(config, module), dtype, device)
    return AdapterWeights(key=key, path=path, rank=max(a.shape[0] for a, _ in modules.values()), modules=modules)


_HASHES: OrderedDict[tuple, str] = OrderedDict()  # (file, its stat) -> sha256, most recent last
_HASHES_MAX = 1024
_HASHES_LOCK = threading.Lock()


def cached_sha256(file: Path) -> str:
    """:func:`~lora_kit.registry.lineage.sha256_file` of ``file``, cached by its stat (a rewrite
    changes mtime/ctime: rehashed), so a busy server does not re-read an adapter per load."""
    st = os.stat(file)
    stamp = (str(file), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _HASHES_LOCK:
        digest = _HASHES.get(stamp)
        if digest is not None:
            _HASHES.move_to_end(stamp)
            return digest
    digest = sha256_file(file)
    with _HASHES_LOCK:
        _HASHES[stamp] = digest
        while len(_HASHES) > _HASHES_MAX:
            _HASHES.popitem(last=False)
    return digest


def verify_files(key: str, path: Path, files: Mapping[str, Mapping[str, Any]]) -> None:
    """Check the adapter files in ``path`` against the sha256 the registry recorded for them.

    Raises AdapterError naming ``key`` only (the client's reference, never a server path); the
    path and both digests go to the log."""
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        expected = (files.get(fname) or {}).get("sha256")
        if not expected:
            continue
        try:
            got = cached_sha256(path / fname)
        except OSError as err:
            log.error("adapter %s: cannot read %s: %s", key, path / fname, err)
            raise AdapterError(f"adapter '{key}': its stored {fname} cannot be read") from None
        if got != expected:
            log.error(
                "adapter %s: %s does not match the registry (sha256 %s, expected %s); refusing to load it. "
                "Run `lora-kit adapters verify %s`",
                key,
                path / fname,
                got,
                expected,
                key,
            )
            raise AdapterError(
                f"adapter '{key}' is corrupted: its {fname} does not match the sha256 recorded in the registry"
            )


def _read_pairs(path: Path, where: str) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's tensors: module path -> {"A": lora_A, "B": lora_B}; errors say ``where``."""
    from safetensors import safe_open

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            for name in f.keys():
                key = parse_tensor_name(name)
                if key is None or key.kind != "linear":
                    raise AdapterError(
                        f"{where}: weight '{name}' is not a LoRA A/B matrix of a linear layer "
                        "(embedding/lm_head/DoRA weights cannot be served)"
                    )
                pairs.setdefault(key.module, {})[key.part] = f.get_tensor(name)
    except AdapterError:
        raise
    except Exception as err:  # a corrupt or truncated file is this adapter's problem, not the server's
        raise AdapterError(f"{where}: cannot read {WEIGHTS_FILE}: {hide_paths(str(err), (path,))}") from err
    if not pairs:
        raise AdapterError(f"{where}: the adapter has no LoRA weights")
    return pairs


def _check_shapes(
    where: str, module: str, a: torch.Tensor, b: torch.Tensor, base: tuple[int, int], max_rank: int
) -> None:
    """``a`` (r, in) and ``b`` (out, r) must fit the base layer ``base`` = (in, out), r <= ``max_rank``."""
    fan_in, fan_out = base
    rank = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, rank):
        raise AdapterError(
            f"{where}: '{module}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the base layer is "
            f"{fan_in} -> {fan_out} (was the adapter trained on another base model?)"
        )
    if rank > max_rank:
        raise AdapterError(f"{where}: rank {rank} of '{module}' exceeds the engine's max rank {max_rank}")


def _scaled(
    where: str, module: str, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``scale * b`` in ``dtype`` on ``device`` (the scale folded in, in float64)."""
    import torch

    a_c = a.to(device=device, dtype=dtype).contiguous()
    b_c = (b.double() * scale).to(device=device, dtype=dtype).contiguous()
    # A NaN/inf weight turns every logit of a row on this adapter into NaN, which no
    # sampler can decode: refuse it at load time with a clear error, for this adapter only.
    if not (torch.isfinite(a_c).all() and torch.isfinite(b_c).all()):
        raise AdapterError(f"{where}: '{module}' has NaN or infinite weights (after scaling to {dtype})")
    return a_c, b_c


def resolve_adapter(resolver: Resolver, ref: str) -> ResolvedAdapter:
    """``resolver(ref)`` as a ResolvedAdapter, its failures as engine errors: an EngineError as it
    is, a failed lookup (KeyError, LookupError, FileNotFoundError) as UnknownAdapter, never a fall-back."""
    try:
        resolved = resolver(ref)
    except EngineError:
        raise
    except (LookupError, FileNotFoundError) as err:
        raise UnknownAdapter(f"unknown adapter '{ref}'") from err
    if isinstance(resolved, ResolvedAdapter):
        return resolved
    key, path = resolved
    return ResolvedAdapter(key, path)


def registry_resolver(root: Path | str | None = None) -> Resolver:
    """A resolver over the lora-kit registry: ref -> (canonical ``name@version``, adapter directory).

    The registry is opened on first use (not at engine start), and once.
    """
    opened: list = []

    def resolve(ref: str) -> tuple[str, Path]:
        from lora_kit import registry
        from lora_kit.registry import store

        if not opened:
            opened.append(registry.Registry(Path(root) if root is not None else None))
        reg = opened[0]
        # Messages reach HTTP clients: no registry path, no other adapter's name (the CLI,
        # which calls the registry itself, keeps those hints for the operator).
        try:
            version = reg.resolve(ref)
            return ResolvedAdapter(version.ref, reg.version_dir(version), version.files)
        except store.InvalidReference as err:
            raise InvalidAdapterReference(str(err)) from err
        except store.AdapterNotFound as err:
            raise UnknownAdapter(err.public) from err
        except registry.RegistryError as err:  # e.g. a stored file is missing
            raise AdapterError(
                f"adapter '{ref}' cannot be read from the registry; `lora-kit adapters verify` tells why"
            ) from err

    return resolve


def mapping_resolver(adapters: Mapping[str, Path | str]) -> Resolver:
    """A resolver over a plain ``{name: directory}`` mapping (tests, benchmarks)."""

    def resolve(ref: str) -> tuple[str, Path]:
        if not isinstance(ref, str) or not ref:
            raise InvalidAdapterReference(f"invalid adapter reference {ref!r}: name one of the served adapters")
        if ref not in adapters:
            raise UnknownAdapter(f"unknown adapter '{ref}'")
        return ref, Path(adapters[ref])

    return resolve
