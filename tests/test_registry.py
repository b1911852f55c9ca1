"""The adapter registry on real PEFT adapters made on the tiny Mistral."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from helpers import TARGETS, make_adapter

from lora_kit.registry import (
    KILL_HOOK_ENV,
    AdapterNotFound,
    InvalidAdapter,
    InvalidName,
    Registry,
    RegistryError,
)
from lora_kit.registry.export import export_adapter, export_archive, import_archive

# the installed console script; `python -m lora_kit` where the venv lacks it
_SCRIPT = Path(sys.executable).parent / "lora-kit"
LORA_KIT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "lora_kit"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_mistral_dir):
    """Two different adapters (seed 1 and 2) for the tiny Mistral."""
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_mistral_dir, root / "a1", seed=1), make_adapter(tiny_mistral_dir, root / "a2", seed=2)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORA_KIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*LORA_KIT, "adapters", *args], capture_output=True, text=True, env=env, timeout=120)


def blobs(reg: Registry) -> set[str]:
    return {p.name for p in (reg.root / "blobs").glob("*/*")}


# -- references --------------------------------------------------------------------------------


def test_register_and_resolve_by_name_version_alias_and_id(tmp_path, adapters, tiny_mistral_dir):
    a1, a2 = adapters
    reg = Registry(tmp_path / "reg")
    v1 = reg.register(a1, "demo", description="first", tags=["t1"], lineage={"recipe_hash": "abc"})
    v2 = reg.register(a2, "demo")

    assert (v1.ref, v2.ref) == ("demo@1", "demo@2")
    assert v1.id != v2.id
    assert v1.rank == 4 and v1.alpha == 8.0
    assert v1.target_modules == sorted(TARGETS)
    assert v1.base_model == str(tiny_mistral_dir)
    assert v1.description == "first" and v1.tags == ["t1"]
    assert v1.warnings == []
    assert v1.files == {
        n: {"sha256": sha(a1 / n), "size": (a1 / n).stat().st_size}
        for n in ("adapter_config.json", "adapter_model.safetensors")
    }
    assert v1.lineage["recipe_hash"] == "abc"
    assert v1.lineage["lora_config"]["r"] == 4
    assert len(v1.lineage["base_model"]["fingerprint"]) == 64

    assert reg.resolve("demo").id == v2.id  # latest
    assert reg.resolve("demo@1").id == v1.id
    assert reg.resolve(v1.id).ref == "demo@1"
    assert reg.tag("demo@1", "prod").aliases == ["prod"]
    assert reg.resolve("demo:prod").id == v1.id
    reg.tag("demo@2", "prod")  # moving an alias
    assert reg.resolve("demo:prod").id == v2.id
    assert [v.ref for v in reg.list()] == ["demo@1", "demo@2"]

    with pytest.raises(AdapterNotFound, match="did you mean demo"):
        reg.resolve("dmeo")
    with pytest.raises(AdapterNotFound, match="has no version 9; versions: 1, 2"):
        reg.resolve("demo@9")
    with pytest.raises(AdapterNotFound, match="no alias 'staging'"):
        reg.resolve("demo:staging")

    path = reg.adapter_path("demo@1")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sha(path / "adapter_model.safetensors") == sha(a1 / "adapter_model.safetensors")

    # identical files are stored once (the two configs are equal too); removing a version
    # deletes only the files no other version uses
    assert len(blobs(reg)) == 3
    reg.register(a1, "copy")
    assert len(blobs(reg)) == 3
    with pytest.raises(RegistryError, match="alias"):
        reg.remove("demo@2")
    reg.remove("demo@2", force=True)
    assert len(blobs(reg)) == 2 and [v.ref for v in reg.list()] == ["copy@1", "demo@1"]
    reg.remove("demo@1")
    assert len(blobs(reg)) == 2  # still used by copy@1
    assert reg.register(a2, "demo").ref == "demo@3"  # version numbers are never reused


@pytest.mark.parametrize("name", ["../x", "A B", "..", ".", "", "x/y", "-a", "a" * 65, "Demo", "a:b", "a@1"])
def test_bad_names_are_refused(tmp_path, adapters, name):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(InvalidName, match="invalid adapter name"):
        reg.register(adapters[0], name)
    assert reg.list() == [] and blobs(reg) == set()


def test_pickle_files_are_refused(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    bad = tmp_path / "bad"
    shutil.copytree(adapters[0], bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(InvalidAdapter, match="adapter_model.bin.*pickle files can run arbitrary code"):
        reg.register(bad, "x")
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    shutil.copy(adapters[0] / "adapter_config.json", only_bin)
    (only_bin / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidAdapter, match="pickle"):
        reg.register(only_bin, "x")
    assert reg.list() == []


# -- validation --------------------------------------------------------------------------------


def _rewrite_tensor(adapter_dir: Path, key_part: str, fn) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if key_part in k)
    tensors[key] = fn(tensors[key])
    save_file(tensors, path)


def test_tensor_shape_mismatch_is_detected(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    bad_rank = tmp_path / "bad_rank"
    shutil.copytree(adapters[0], bad_rank)
    _rewrite_tensor(bad_rank, "layers.0.self_attn.q_proj.lora_A", lambda t: t[:3].clone())
    with pytest.raises(
        InvalidAdapter, match=r"model.layers.0.self_attn.q_proj: shapes A\[3, 64\] B\[64, 4\] do not match rank 4"
    ):
        reg.register(bad_rank, "x")

    # consistent rank but the wrong output size for this base: caught against the base's safetensors header
    bad_out = tmp_path / "bad_out"
    shutil.copytree(adapters[0], bad_out)
    _rewrite_tensor(bad_out, "layers.1.self_attn.o_proj.lora_B", lambda t: t[:60].clone())
    with pytest.raises(
        InvalidAdapter,
        match=r"model.layers.1.self_attn.o_proj: LoRA A\[4, 64\] B\[60, 4\] do not fit the base weight \[64, 64\]",
    ):
        reg.register(bad_out, "x")
    assert reg.list() == []


def test_target_module_missing_from_base_is_detected(tmp_path, adapters, word_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    # the same dimensions but one layer: the adapter's layer-1 modules have no home
    cfg = MistralConfig(
        vocab_size=len(word_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "one_layer")
    reg = Registry(tmp_path / "reg")
    with pytest.raises(InvalidAdapter, match="model.layers.1.mlp.down_proj: no such module in the base model"):
        reg.register(adapters[0], "x", base_model=str(tmp_path / "one_layer"))

    # a target module the base does not have at all
    odd = tmp_path / "odd"
    shutil.copytree(adapters[0], odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    config["target_modules"] = TARGETS + ["c_attn"]
    (odd / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidAdapter, match="target module 'c_attn' does not exist in the base model"):
        reg.register(odd, "x")
    assert reg.list() == []


def test_modules_to_save_is_flagged_and_blocks_server_exports(tmp_path, tiny_mistral_dir):
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "mts", modules_to_save=["lm_head"])
    reg = Registry(tmp_path / "reg")
    v = reg.register(adapter, "heady")
    assert any("saves whole modules (lm_head.weight)" in w for w in v.warnings)
    with pytest.raises(RegistryError, match="Cloudflare.*modules_to_save"):
        export_adapter(reg, "heady", tmp_path / "cf", target="cloudflare")
    with pytest.raises(RegistryError, match="vLLM.*modules_to_save"):
        export_adapter(reg, "heady", tmp_path / "vl", target="vllm")
    assert not (tmp_path / "cf").exists() and not (tmp_path / "vl").exists()


# -- integrity ---------------------------------------------------------------------------------


def test_verify_catches_a_corrupted_byte(tmp_path, adapters):
    home = tmp_path / "home"
    reg = Registry(home / "registry")
    v = reg.register(adapters[0], "demo")
    assert reg.verify() == []
    ok = cli(home, "verify")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "ok: 1 version(s) verified"

    blob = reg.blob_path(v.files["adapter_model.safetensors"]["sha256"])
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))

    problems = reg.verify()
    assert len(problems) == 1 and problems[0].startswith("demo@1: adapter_model.safetensors is corrupted")
    bad = cli(home, "verify", "demo@1")
    assert bad.returncode == 1
    assert "CORRUPT: demo@1: adapter_model.safetensors is corrupted" in bad.stdout


_REGISTER_SCRIPT = """
import sys, time
from pathlib import Path
from lora_kit.registry import Registry
root, adapter, go = sys.argv[1:4]
reg = Registry(Path(root))
while not Path(go).exists():
    time.sleep(0.01)
print(reg.register(adapter, "same").ref)
"""


def test_two_processes_register_concurrently(tmp_path, adapters):
    root = tmp_path / "reg"
    Registry(root)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER_SCRIPT, str(root), str(a), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in adapters
    ]
    go.touch()  # both start registering at the same moment
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert sorted(o[0].strip() for o in outs) == ["same@1", "same@2"]
    reg = Registry(root)
    assert len({v.id for v in reg.list()}) == 2
    assert reg.verify() == []


def test_identical_registrations_at_once_add_one_version_whose_files_stay_readable(tmp_path, adapters, monkeypatch):
    """Issue 29 item 3: concurrent registrations of the same files (unless_latest_is_identical) add
    one version; every caller reads its directory at once, while the others (re)build it, and
    never finds a file missing (a twin's complete directory is never removed)."""
    from concurrent.futures import ThreadPoolExecutor

    reg = Registry(tmp_path / "reg")
    link = os.link
    monkeypatch.setattr(os, "link", lambda *a: time.sleep(0.02) or link(*a))  # builders overlap readers

    def register_and_read(_: int) -> tuple[str, int]:
        av = reg.register(adapters[0], "same", unless_latest_is_identical=True)
        where = reg.version_dir(av)
        return av.ref, sum(len((where / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors"))

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(register_and_read, range(6)))
    assert {ref for ref, _ in results} == {"same@1"} and len({size for _, size in results}) == 1
    assert [v.ref for v in reg.list()] == ["same@1"]
    av = reg.resolve("same@1")
    for _ in range(10):  # the version directory rebuilt by several readers at once
        shutil.rmtree(reg.root / "versions" / av.id)
        with ThreadPoolExecutor(6) as pool:
            sizes = list(
                pool.map(lambda _: (reg.version_dir(av) / "adapter_model.safetensors").stat().st_size, range(6))
            )
        assert len(set(sizes)) == 1
    assert reg.register(adapters[1], "same", unless_latest_is_identical=True).ref == "same@2"  # new files: new version


@pytest.mark.parametrize("point", ["staged", "blobs", "inserted"])
def test_registration_killed_midway_leaves_registry_consistent(tmp_path, adapters, point):
    root = tmp_path / "reg"
    reg = Registry(root)
    v1 = reg.register(adapters[0], "demo")
    env = {**os.environ, KILL_HOOK_ENV: point}
    script = "import sys; from lora_kit.registry import Registry; Registry(sys.argv[1]).register(sys.argv[2], 'demo')"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(root), str(adapters[1])], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL

    assert [v.id for v in Registry(root).list()] == [v1.id]  # no half-registered version
    assert reg.verify() == []
    # the dead registration left garbage behind (a staging dir; past "staged", a new blob too) ...
    assert list((root / "tmp").iterdir()) != []
    assert len(blobs(reg)) == (2 if point == "staged" else 3)
    reg.gc()  # ... which gc removes
    assert blobs(reg) == {m["sha256"] for m in v1.files.values()}
    assert list((root / "tmp").iterdir()) == []
    v2 = reg.register(adapters[1], "demo")
    assert v2.ref == "demo@2" and reg.verify() == []


# -- export / import ---------------------------------------------------------------------------


def test_archive_round_trip_restores_identical_files(tmp_path, adapters):
    src = Registry(tmp_path / "src")
    v = src.register(adapters[0], "demo", description="d", tags=["x"], lineage={"dataset_fingerprint": "f00"})
    archive = export_archive(src, "demo@1", tmp_path / "demo.tar.gz").path
    (tmp_path / "out").mkdir()
    again = export_archive(src, "demo@1", tmp_path / "out").path
    assert again.name == "demo-v1.tar.gz"
    assert sha(archive) == sha(again)  # deterministic archives

    dst = Registry(tmp_path / "dst")
    w = import_archive(dst, archive)
    assert w.ref == "demo@1" and w.id != v.id
    assert w.files == v.files
    assert (w.description, w.tags, w.rank, w.target_modules) == (v.description, v.tags, v.rank, v.target_modules)
    assert w.lineage["dataset_fingerprint"] == "f00"
    assert w.lineage["imported_from"]["id"] == v.id
    for name in v.files:
        assert (dst.adapter_path(w.ref) / name).read_bytes() == (adapters[0] / name).read_bytes()

    # an archive that tries to write outside the registry is refused member by member
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(InvalidAdapter, match="archive member '../escape.txt' refused"):
        import_archive(dst, evil)
    assert not (tmp_path / "dst" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()


def _logits(base_dir: Path, adapter_dir: Path):
    import torch
    from peft import PeftModel
    from transformers import MistralForCausalLM

    model = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(base_dir), adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 6, 7, 8, 3]])).logits


def test_exported_adapter_loads_with_plain_peft_and_gives_same_logits(tmp_path, adapters, tiny_mistral_dir):
    import torch
    from transformers import MistralForCausalLM

    reg = Registry(tmp_path / "reg")
    reg.register(adapters[0], "demo")
    peft_dir = export_adapter(reg, "demo", tmp_path / "peft").path
    cf = export_adapter(reg, "demo", tmp_path / "cf", target="cloudflare")
    vl = export_adapter(reg, "demo", tmp_path / "vllm", target="vllm")

    expected = _logits(tiny_mistral_dir, adapters[0])
    with torch.no_grad():
        base = MistralForCausalLM.from_pretrained(tiny_mistral_dir)(torch.tensor([[1, 5, 6, 7, 8, 3]])).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter really changes the output
    assert torch.equal(_logits(tiny_mistral_dir, peft_dir), expected)
    assert torch.equal(_logits(tiny_mistral_dir, cf.path), expected)

    assert sorted(p.name for p in cf.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cf_config = json.loads((cf.path / "adapter_config.json").read_text())
    orig_config = json.loads((adapters[0] / "adapter_config.json").read_text())
    assert cf_config == {**orig_config, "model_type": "mistral"}
    assert sha(cf.path / "adapter_model.safetensors") == sha(adapters[0] / "adapter_model.safetensors")
    assert vl.notes[-1].endswith(f"--enable-lora --lora-modules demo={(tmp_path / 'vllm').resolve()}")
    with pytest.raises(RegistryError, match="exists and is not an empty directory"):
        export_adapter(reg, "demo", tmp_path / "peft")


def test_cloudflare_refuses_rank_over_32(tmp_path, tiny_mistral_dir):
    reg = Registry(tmp_path / "reg")
    reg.register(make_adapter(tiny_mistral_dir, tmp_path / "r40", r=40), "wide")
    with pytest.raises(RegistryError, match="rank 40 is over Cloudflare's limit of 32"):
        export_adapter(reg, "wide", tmp_path / "cf", target="cloudflare")
    vl = export_adapter(reg, "wide", tmp_path / "vl", target="vllm")
    assert "--max-lora-rank 64" in vl.notes[-1]


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_add_list_show_tag_rm(tmp_path, adapters):
    home = tmp_path / "home"
    add = cli(home, "add", str(adapters[0]), "--name", "demo", "--description", "hello", "--tag", "t")
    assert add.returncode == 0, add.stderr
    assert add.stdout.strip().splitlines()[-1] == "demo@1"

    listed = cli(home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["ref"] for r in rows] == ["demo@1"]
    assert rows[0]["description"] == "hello" and rows[0]["tags"] == ["t"] and rows[0]["rank"] == 4
    assert rows[0]["export_targets"] == ["peft", "cloudflare", "vllm", "gguf"]  # as /v1/models lists them

    assert cli(home, "tag", "demo@1", "prod").returncode == 0
    shown = cli(home, "show", "demo:prod", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {**rows[0], "aliases": ["prod"]}

    bad = cli(home, "add", str(adapters[0]), "--name", "../x")
    assert bad.returncode == 2 and "invalid adapter name '../x'" in bad.stderr
    refused = cli(home, "rm", "demo@1")
    assert refused.returncode == 2 and "alias(es) demo:prod" in refused.stderr
    assert cli(home, "rm", "demo@1", "--force").returncode == 0
    assert json.loads(cli(home, "list", "--json").stdout) == []
