"""Recipe schema: YAML -> validated pydantic model, dotted overrides, content hash.

Unknown or misspelled keys are an error that names the key and suggests the closest
valid one, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_kit.errors import LoraKitError, not_utf8
from lora_kit.models import DEFAULT_MODEL

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RecipeError(LoraKitError, ValueError):
    """A recipe that cannot be used; the message names the key and what is wrong."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    base: str = DEFAULT_MODEL
    quantization: Literal["nf4", "fp4", "none"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # The attention kernel ("auto": transformers' default). No flash_attention_2: packed rows need
    # the 4D block-diagonal mask of training/packing.py, which sdpa and eager take.
    attn_implementation: Literal["auto", "sdpa", "eager"] = "sdpa"


class LoraSection(_Section):
    r: int = Field(8, ge=1, le=512)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_rslora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules must not be empty")
        return value


class Columns(_Section):
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"


class DataSection(_Section):
    train: str | list[str]
    eval: str | list[str] | None = None
    eval_split: float = Field(0.0, ge=0, lt=1)
    split: str = "train"  # split of a `datasets` id
    format: Literal["messages", "prompt_completion", "alpaca"] = "messages"
    columns: Columns = Columns()
    system_prompt: str | None = None
    max_seq_len: int = Field(512, ge=8)
    packing: bool = True


class TrainSection(_Section):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = True
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    seed: int = 42
    eval_every: int = Field(0, ge=0)  # steps; 0 = only at the end
    checkpoint_every: int = Field(0, ge=0)  # steps; 0 = no intermediate checkpoints
    log_every: int = Field(1, ge=1)
    # How processes share the work: none (one process), ddp (a full replica per process) or fsdp
    # (base, LoRA weights and optimizer state sharded across processes; see training/fsdp.py).
    # Unset: ddp when launched with more than one process, else none.
    distributed: Literal["none", "ddp", "fsdp"] | None = None


class EvalSection(_Section):
    # Measured through the serving engine (lora_kit.evaluation.metrics: the same names as `lora-kit eval`).
    task_metric: Literal["exact_match", "json_fields", "contains", "none"] = "exact_match"
    max_examples: int = Field(30, ge=0)
    max_new_tokens: int = Field(32, ge=1)
    compare_base: bool = True


class OutputSection(_Section):
    name: str
    description: str = ""
    tags: list[str] = []
    run_dir: str | None = None
    register_adapter: bool = True  # add the finished adapter to the registry


class Recipe(_Section):
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    output: OutputSection

    @model_validator(mode="after")
    def _eval_source(self) -> Recipe:
        if self.data.eval is not None and self.data.eval_split > 0:
            raise ValueError("data.eval and data.eval_split are exclusive: give an eval file or a split fraction")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the fully resolved recipe."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()


def _known_keys(model: type[BaseModel], path: Sequence[str]) -> list[str]:
    cls: Any = model
    for key in path:
        field = cls.model_fields.get(key)
        if field is None:
            return []
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            return []
    return list(cls.model_fields)


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        dotted = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_keys(Recipe, loc[:-1])
            bad = loc[-1]
            close = (
                difflib.get_close_matches(bad, known, n=1, cutoff=0.5)
                or [k for k in known if bad.startswith(k) or k.startswith(bad)][:1]
            )
            hint = (
                f"; did you mean '{'.'.join(loc[:-1] + [close[0]])}'?"
                if close
                else (f"; valid keys: {', '.join(known)}" if known else "")
            )
            lines.append(f"unknown key '{dotted}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing key '{dotted}'")
        else:
            lines.append(f"'{dotted}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def parse(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe dictionary."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections (model, lora, data, train, eval, output)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{source}: {_explain(err)}") from None


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise RecipeError(f"--set expects key.path=value, got '{assignment}'")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"--set: bad key '{key}'")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {key}: the value is not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise RecipeError(f"--set {key}: the value is not valid YAML: nested too deeply") from None


def load(path: str | Path, overrides: Sequence[str] = (), name: str | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides (and ``--name``), validate it.

    Relative data paths in a recipe are relative to the working directory.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"no such recipe: {path}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text ({not_utf8(err)}); a recipe is YAML in UTF-8") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise RecipeError(f"{path}: not valid YAML: nested too deeply") from None
    data = data or {}
    for assignment in overrides:
        apply_override(data, assignment)
    if name is not None:
        data.setdefault("output", {})["name"] = name
    return parse(data, source=str(path))
