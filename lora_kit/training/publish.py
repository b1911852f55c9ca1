"""Publishing a finished run's adapter: the PEFT export (config, weights and the chat template it
was trained with), its lineage (``lineage.json``, by the registry's one lineage builder), the
registration, and the task eval's results recorded with the registered version.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_kit.evaluation.runner import EvalReport, record
from lora_kit.training.recipe import Recipe
from lora_kit.training.task_eval import ADAPTER_REF

if TYPE_CHECKING:
    import torch


def export_adapter(
    peft_model: Any,
    tokenizer: Any,
    recipe: Recipe,
    adapter_dir: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the PEFT adapter (config + safetensors) and the chat template it was trained with.

    ``state_dict``: the full LoRA weights by parameter name when the model's own are sharded (FSDP).
    """
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True, state_dict=state_dict)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # The spec the user gave (hub id, path or embedded name), not a cache path.
    config["base_model_name_or_path"] = recipe.model.base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    template = getattr(tokenizer, "chat_template", None)
    (adapter_dir / "chat_template.jinja").write_text(
        template if template else "{# built-in Mistral-7B-Instruct-v0.1 format (lora_kit.chat) #}\n"
    )
    readme = adapter_dir / "README.md"
    if readme.exists():
        readme.unlink()  # PEFT's model card template: replaced by the registry's lineage
    return adapter_dir


def lineage_of(adapter_dir: Path, base_spec: str, facts: dict[str, Any]) -> dict[str, Any]:
    """The lineage the registry records for ``adapter_dir`` registered with ``facts`` (same builder, same base)."""
    from lora_kit.adapters.format import CONFIG_FILE, parse_config
    from lora_kit.registry import lineage, local_base_dir

    config = parse_config(adapter_dir / CONFIG_FILE)
    return lineage.build(adapter_dir, config, base_spec, local_base_dir(base_spec), facts=facts)


def register(adapter_dir: Path, recipe: Recipe, facts: dict[str, Any]) -> str:
    """Register the exported adapter with the training ``facts`` in its lineage; returns NAME@VERSION."""
    from lora_kit.registry import Registry

    version = Registry().register(
        adapter_dir,
        recipe.output.name,
        base_model=recipe.model.base,
        description=recipe.output.description,
        tags=recipe.output.tags,
        lineage=facts,
    )
    return version.ref


def register_run(adapter_dir: Path, run_dir: Path, recipe: Recipe, facts: dict[str, Any]) -> str | None:
    """Write the adapter's lineage to ``run_dir/lineage.json`` and register the adapter when
    ``output.register_adapter`` asks; returns NAME@VERSION, or None when not registered."""
    full = lineage_of(adapter_dir, recipe.model.base, facts)
    (run_dir / "lineage.json").write_text(json.dumps(full, indent=2, default=str))
    return register(adapter_dir, recipe, facts) if recipe.output.register_adapter else None


def record_evals(ref: str, reports: list[EvalReport]) -> None:
    """Keep the adapter's task eval results in the registry with version ``ref``, per precision."""
    from lora_kit.registry import Registry

    registry = Registry()
    for report in reports:
        record(registry, report, as_ref={ADAPTER_REF: ref})
