"""The one lineage builder (lora_kit.registry.lineage): the same record whichever way an adapter
enters the registry, and caller facts that add to it but never replace what it computes.

The trainer's side (a `lora-kit train` registration against `adapters add` of the same
directory) is tested in test_train.py, which trains a real adapter.
"""

from pathlib import Path

import pytest
from helpers import make_adapter

from lora_kit.registry import Registry, lineage
from lora_kit.registry.export import export_archive, import_archive


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_mistral_dir):
    """A PEFT adapter for the tiny Mistral with its chat template next to it, as the trainer exports one."""
    out = make_adapter(tiny_mistral_dir, tmp_path_factory.mktemp("adapter") / "a", seed=1)
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return out


def test_caller_facts_never_replace_computed_keys(tmp_path, adapter, tiny_mistral_dir):
    base = Path(tiny_mistral_dir).resolve()
    facts = {"base_model": str(base), "chat_template_sha256": "0" * 64, "recipe_hash": "abc"}
    v = Registry(tmp_path / "reg").register(adapter, "demo", lineage=facts)
    assert v.lineage["base_model"] == {
        "spec": str(base),
        "local_dir": str(base),
        "fingerprint": lineage.base_fingerprint(base),
    }
    assert len(v.lineage["base_model"]["fingerprint"]) == 64
    assert v.lineage["chat_template_sha256"] == lineage.chat_template_sha256(adapter) != "0" * 64
    assert v.lineage["recipe_hash"] == "abc"  # a fact of the caller's own is kept as given
    # what the caller said differently is kept for the record, never in place of the computed value
    assert v.lineage["superseded"] == {"base_model": str(base), "chat_template_sha256": "0" * 64}


def test_the_same_shape_whichever_way_an_adapter_enters(tmp_path, adapter):
    reg = Registry(tmp_path / "reg")
    added = reg.register(adapter, "added").lineage  # `lora-kit adapters add`
    trained = reg.register(adapter, "trained", lineage={"recipe_hash": "abc", "metrics": {"train_loss": 1.0}})
    uploaded = reg.register(adapter, "uploaded", lineage={"source": "finetune-assets upload", "finetune_id": "f1"})
    archive = export_archive(reg, "trained@1", tmp_path / "trained.tar.gz").path
    imported = import_archive(Registry(tmp_path / "elsewhere"), archive, name="imported").lineage

    for entered in (trained.lineage, uploaded.lineage):
        assert {k: entered[k] for k in added} == added
    assert set(added) == {"lora_kit_version", "lora_config", "source_dir", "base_model", "chat_template_sha256"}
    # An archive carries the two adapter files only: the base is fingerprinted again here, the
    # chat-template hash it cannot check stays with the source's record under `superseded`.
    for key in ("lora_kit_version", "lora_config", "base_model"):
        assert imported[key] == added[key], key
    assert imported["recipe_hash"] == "abc" and imported["imported_from"]["ref"] == "trained@1"
    assert imported["superseded"]["chat_template_sha256"] == added["chat_template_sha256"]
    assert imported["superseded"]["source_dir"] == added["source_dir"] != imported["source_dir"]
