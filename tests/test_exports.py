"""Exports that go anywhere: GGUF LoRA files for llama.cpp, adapters merged into their base, and
the export targets listed per adapter. Real PEFT adapters on a tiny random Mistral; the GGUF is
read back with ``gguf.GGUFReader`` and, where a ``llama-server`` binary exists, loaded by llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CHAT_TEXTS
from helpers import TARGETS, make_adapter, make_tiny_mistral, make_tokenizer

from lora_kit.models import ModelError
from lora_kit.registry import Registry, RegistryError
from lora_kit.registry.export import CLOUDFLARE_MAX_BYTES, export_adapter
from lora_kit.registry.gguf import GgufExportError
from lora_kit.registry.merge import MergeError, merge_adapter
from lora_kit.registry.targets import export_targets, header_info, version_targets

CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
# llama.cpp's names for the Llama blocks' linear layers (src/llama-arch.cpp, LLM_ARCH_LLAMA)
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
N_HEAD, N_KV_HEAD, N_LAYERS = 4, 2, 2  # the tiny Mistral of tests/helpers.py
# Merged weights (W + scale * B @ A, summed once) against PEFT's unmerged forward (W x + scale * B (A x)):
# the same arithmetic in another order, so float32 rounding only.
MERGE_ATOL = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Mistral with a chat template, a tiny Qwen2 of the same shapes, and a registry holding:
    plain (r=4), scaled (rsLoRA + alpha_pattern + rank_pattern), dora, wide (r=64), qwen (on the
    Qwen2 base), remote (its base is not on this machine), nf4 (lineage says it trained on NF4)."""
    root = tmp_path_factory.mktemp("exports")
    tok = make_tokenizer(CHAT_TEXTS)
    tok.chat_template = CHAT_TEMPLATE
    base = make_tiny_mistral(root / "base", tok)
    qwen = make_tiny_qwen2(root / "qwen-base", tok)
    dirs = {
        "plain": make_adapter(base, root / "plain", seed=1),
        "scaled": make_adapter(
            base, root / "scaled", seed=2, use_rslora=True, alpha_pattern={"v_proj": 32}, rank_pattern={"o_proj": 2}
        ),
        "dora": make_adapter(base, root / "dora", seed=3, use_dora=True),
        "wide": make_adapter(base, root / "wide", seed=4, r=64),
        "embed": make_embedding_adapter(base, root / "embed"),
    }
    home = root / "home"
    reg = Registry(home / "registry")
    for name, path in dirs.items():
        reg.register(path, name)
    reg.register(dirs["plain"], "qwen", base_model=str(qwen))
    reg.register(dirs["plain"], "remote", base_model="acme/not-on-this-machine")
    reg.register(dirs["plain"], "nf4", lineage={"recipe": {"model": {"quantization": "nf4"}}})
    return SimpleNamespace(root=root, home=home, base=base, reg=reg, dirs=dirs, tokenizer=tok)


def make_embedding_adapter(base_dir: Path, out: Path) -> Path:
    """A PEFT LoRA on embed_tokens (an embedding LoRA) and q_proj, lora_B randomised."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    peft_model.save_pretrained(out, save_embedding_layers=False)  # LoRA tensors only, no full embedding copy
    return out


def make_tiny_qwen2(path: Path, tokenizer) -> Path:
    """A random Qwen2ForCausalLM with the tiny Mistral's shapes: an architecture GGUF export refuses."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV_HEAD,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (ne as a list, numpy data)) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: ([int(n) for n in t.shape], t.data) for t in reader.tensors}
    return fields, tensors


def peft_tensors(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module (e.g. ``model.layers.0.self_attn.q_proj``) -> {"A": (r, in), "B": (out, r)} as saved by PEFT."""
    from safetensors.torch import load_file

    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        module, part = name.removeprefix("base_model.model.").rsplit(".lora_", 1)
        out.setdefault(module, {})[part.split(".")[0][-1]] = tensor  # lora_A.weight, lora_embedding_B...
    return out


def gguf_row_order(out: int, n_head: int) -> list[int]:
    """For each row of a GGUF q/k weight, the Hugging Face row it holds: llama.cpp interleaves each
    head's two rotary halves (GGUF row h*d + 2j + k is HF row h*d + k*d/2 + j)."""
    d = out // n_head
    return [h * d + k * (d // 2) + j for h in range(n_head) for j in range(d // 2) for k in range(2)]


def gguf_name(module: str) -> str:
    layer, rest = module.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[rest]}.weight"


# -- GGUF --------------------------------------------------------------------------------------


def test_gguf_file_has_llama_cpp_names_metadata_and_the_peft_values(world):
    dest = export_adapter(world.reg, "plain", world.root / "plain.gguf", target="gguf").path
    fields, tensors = read_gguf(dest)

    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0  # raw lora_alpha: llama.cpp divides by each tensor's rank
    assert fields["general.name"] == "plain@1"
    assert fields["general.base_model.0.name"] == str(world.base)
    assert set(tensors) == {
        f"blk.{i}.{n}.weight.lora_{p}" for i in range(N_LAYERS) for n in GGUF_NAMES.values() for p in "ab"
    }
    base_shapes = {k: list(v.shape) for k, v in safetensors_weights(world.base).items()}
    for module, parts in peft_tensors(world.dirs["plain"]).items():
        a, b = parts["A"].numpy(), parts["B"].numpy()
        (a_ne, a_data), (b_ne, b_data) = tensors[gguf_name(module) + ".lora_a"], tensors[gguf_name(module) + ".lora_b"]
        out_dim, in_dim = base_shapes[module + ".weight"]
        # llama.cpp's checks: lora_a.ne[0] == base ne[0] (in), lora_b.ne[1] == base ne[1] (out), a.ne[1] == b.ne[0]
        assert a_ne == [in_dim, 4] and b_ne == [4, out_dim]
        assert (a_data == a).all()
        if module.endswith(("q_proj", "k_proj")):
            heads = N_HEAD if module.endswith("q_proj") else N_KV_HEAD
            assert (b_data == b[gguf_row_order(out_dim, heads)]).all()
            assert not (b_data == b).all()  # the permutation moved rows
        else:
            assert (b_data == b).all()


def test_gguf_embedding_lora_has_llama_cpp_token_embd_layout(world):
    """llama.cpp's token_embd LoRA wants lora_a as (vocab, r) and lora_b as (dim, r) (its convert script's layout)."""
    _, tensors = read_gguf(export_adapter(world.reg, "embed", world.root / "embed.gguf", target="gguf").path)
    assert set(tensors) == {"token_embd.weight.lora_a", "token_embd.weight.lora_b"} | {
        f"blk.{i}.attn_q.weight.lora_{p}" for i in range(N_LAYERS) for p in "ab"
    }
    parts = peft_tensors(world.dirs["embed"])["model.embed_tokens"]  # A (r, vocab), B (dim, r)
    vocab, dim = len(world.tokenizer), 64
    (a_ne, a), (b_ne, b) = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    # base token_embd has ne = [dim, vocab]: llama.cpp checks its ne[0] == b.ne[1] and ne[1] == a.ne[1]
    assert a_ne == [4, vocab] and b_ne == [4, dim]
    assert (a == parts["A"].numpy().T).all() and (b == parts["B"].numpy()).all()


def safetensors_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def peft_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """module -> PEFT's own delta weight (out, in), scale included."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default")
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    }


def test_gguf_folds_per_module_scales_into_lora_b(world):
    """rsLoRA, alpha_pattern and rank_pattern scale modules unlike llama.cpp's alpha / rank: each
    module's ratio is folded into lora_b, so llama.cpp's delta equals PEFT's."""
    dest = export_adapter(world.reg, "scaled", world.root / "scaled.gguf", target="gguf").path
    fields, tensors = read_gguf(dest)
    alpha = fields["adapter.lora.alpha"]
    assert alpha == 8.0
    deltas = peft_deltas(world.base, world.dirs["scaled"])
    assert len(deltas) == N_LAYERS * len(TARGETS)
    for module, expected in deltas.items():
        (_, a), (b_ne, b) = tensors[gguf_name(module) + ".lora_a"], tensors[gguf_name(module) + ".lora_b"]
        rank = b_ne[0]
        assert rank == (2 if module.endswith("o_proj") else 4)
        delta = torch.from_numpy(b @ a) * (alpha / rank)  # what llama.cpp adds: scale = alpha / rank
        if module.endswith(("q_proj", "k_proj")):
            order = gguf_row_order(delta.shape[0], N_HEAD if module.endswith("q_proj") else N_KV_HEAD)
            expected = expected[order]
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)


def test_gguf_export_refuses_what_llama_cpp_cannot_load(world, tmp_path):
    with pytest.raises(GgufExportError, match="DoRA"):
        export_adapter(world.reg, "dora", tmp_path / "dora.gguf", target="gguf")
    with pytest.raises(GgufExportError, match="Qwen2ForCausalLM; GGUF export supports LlamaForCausalLM, Mistral"):
        export_adapter(world.reg, "qwen", tmp_path / "qwen.gguf", target="gguf")
    with pytest.raises(GgufExportError, match="not on this machine.*huggingface-cli download acme/not-on-this-mach"):
        export_adapter(world.reg, "remote", tmp_path / "remote.gguf", target="gguf")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file

    # DEST may be a directory (NAME-vVERSION.gguf in it); an existing file is never overwritten
    path = export_adapter(world.reg, "plain", tmp_path, target="gguf").path
    assert path == tmp_path / "plain-v1.gguf" and path.stat().st_size > 0
    with pytest.raises(RegistryError, match="exists; refusing to overwrite"):
        export_adapter(world.reg, "plain", path, target="gguf")


LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR")  # a llama.cpp checkout (with convert_lora_to_gguf.py)


@pytest.mark.skipif(
    not (LLAMA_CPP_DIR and Path(LLAMA_CPP_DIR, "convert_lora_to_gguf.py").is_file()),
    reason="set LLAMA_CPP_DIR to a llama.cpp checkout to compare with its convert_lora_to_gguf.py",
)
def test_gguf_tensors_equal_llama_cpp_converter_output(world, tmp_path):
    """llama.cpp's own converter on the same adapter writes the same tensors, bit for bit."""
    ours = export_adapter(world.reg, "plain", tmp_path / "ours.gguf", target="gguf").path
    script = Path(LLAMA_CPP_DIR, "convert_lora_to_gguf.py")
    cmd = [sys.executable, str(script), "--base", str(world.base), "--outfile", str(tmp_path / "ref.gguf")]
    subprocess.run([*cmd, str(world.dirs["plain"])], check=True, capture_output=True, timeout=300)
    ref_fields, ref = read_gguf(tmp_path / "ref.gguf")
    our_fields, mine = read_gguf(ours)
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert our_fields[key] == ref_fields[key]
    assert set(mine) == set(ref)
    for name, (ne, data) in ref.items():
        assert mine[name][0] == ne and (mine[name][1] == data).all(), name


LLAMA_SERVER = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")


@pytest.mark.skipif(
    not LLAMA_SERVER, reason="no llama.cpp llama-server binary (put it on PATH or set LLAMA_SERVER=/path/to/it)"
)
def test_llama_server_loads_the_gguf_and_the_adapter_changes_its_output(tmp_path):
    """The embedded SmolLM2 ships as GGUF: llama-server runs it with our GGUF LoRA at scale 0 and 1."""
    import httpx
    from peft import LoraConfig, get_peft_model

    from lora_kit import models

    spec = models.DEFAULT_MODEL
    peft_model = get_peft_model(
        models.load_model(spec), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"])
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    reg = Registry(tmp_path / "registry")
    reg.register(tmp_path / "adapter", "smol", base_model=spec)
    lora = export_adapter(reg, "smol", tmp_path / "smol.gguf", target="gguf").path
    base_gguf = models._find_gguf(models.EMBEDDED[spec])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [LLAMA_SERVER, "-m", str(base_gguf), "--lora", str(lora), "--port", str(port), "-c", "512", "-np", "1"]
    log = tmp_path / "llama-server.log"  # a file, not a pipe: its verbose log must never block it
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log)
        outputs = [
            httpx.post(
                f"{url}/completion",
                json={"prompt": "The capital of France is", "n_predict": 12, "temperature": 0, "lora": mix},
                timeout=120,
            ).json()["content"]
            for mix in ([{"id": 0, "scale": 0.0}], [{"id": 0, "scale": 1.0}])
        ]
    finally:
        proc.terminate()
        proc.wait(30)
    assert outputs[0] != outputs[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"llama-server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("llama-server did not become healthy")


# -- merge -------------------------------------------------------------------------------------


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_merged_model_equals_base_plus_adapter(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_kit import models

    result = merge_adapter(world.reg, "scaled", tmp_path / "merged", dtype="float32")
    out = result.path
    assert out == tmp_path / "merged" and result.dtype == "float32"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "lineage.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp dir left beside it

    ids = world.tokenizer("What is two plus two ? Four . And three plus three ?")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    base_logits = logits(base, ids)
    reference = logits(PeftModel.from_pretrained(base, world.dirs["scaled"]), ids)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (reference - base_logits).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(logits(merged, ids), reference, rtol=0, atol=MERGE_ATOL)
    served = models.load_model(str(out), device=torch.device("cpu"))  # what `lora-kit serve --model OUT` loads
    torch.testing.assert_close(logits(served, ids), reference, rtol=0, atol=MERGE_ATOL)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE

    lineage = json.loads((out / "lineage.json").read_text())
    version = world.reg.resolve("scaled")
    assert lineage["merge"] == {
        "adapter_ref": "scaled@1",
        "adapter_id": version.id,
        "adapter_sha256": version.files["adapter_model.safetensors"]["sha256"],
        "dtype": "float32",
        "dequantized_base": None,
    }
    assert lineage["parent"] == {"ref": "scaled@1", "id": version.id}
    assert lineage["base_model"]["spec"] == str(world.base)
    assert lineage["lora_config"]["use_rslora"] is True


def test_merge_of_an_nf4_adapter_says_it_merges_into_the_dequantized_base(world, tmp_path):
    said: list[str] = []
    result = merge_adapter(world.reg, "nf4", tmp_path / "m", log=said.append)
    assert result.dtype == "float32"  # the base's own dtype (config.json)
    assert any("NF4 base: merging into the dequantized (full-precision) base" in line for line in said)
    assert "dequantized" in result.notes[0]
    assert json.loads((tmp_path / "m" / "lineage.json").read_text())["merge"]["dequantized_base"] == "nf4"


def test_merge_refuses_a_used_output_and_a_failed_merge_leaves_nothing(world, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="exists and is not an empty directory"):
        merge_adapter(world.reg, "plain", used)
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    with pytest.raises(MergeError, match="dtype must be one of bfloat16, float16, float32"):
        merge_adapter(world.reg, "plain", tmp_path / "x", dtype="int8")
    # the base cannot be loaded (not on this machine, hub offline): no output, no temp dir
    with pytest.raises(ModelError, match="could not load 'acme/not-on-this-machine'"):
        merge_adapter(world.reg, "remote", tmp_path / "remote")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]


# -- export targets ----------------------------------------------------------------------------

EXPECTED_TARGETS = {
    "plain": ["peft", "cloudflare", "vllm", "gguf"],
    "scaled": ["peft", "cloudflare", "vllm", "gguf"],
    "dora": ["peft"],  # Cloudflare, vLLM and llama.cpp refuse DoRA
    "wide": ["peft", "vllm", "gguf"],  # rank 64 > Cloudflare's 32
    "embed": ["peft", "vllm", "gguf"],  # Cloudflare takes no embedding LoRA
    "qwen": ["peft", "vllm"],  # Cloudflare takes mistral/llama/gemma; GGUF export Llama/Mistral
    # GGUF needs the base's config on this machine; Cloudflare its model_type (or --model-type)
    "remote": ["peft", "vllm"],
    "nf4": ["peft", "cloudflare", "vllm", "gguf"],
}


def test_export_targets_are_exactly_the_exports_that_succeed(world, tmp_path):
    for v in world.reg.list():
        targets = version_targets(world.reg, v)
        assert targets == EXPECTED_TARGETS[v.name], v.name
        for target in ("peft", "cloudflare", "vllm", "gguf"):
            dest = tmp_path / f"{v.name}-{target}"
            if target in targets:
                export_adapter(world.reg, v.ref, dest, target=target)
            else:
                with pytest.raises(RegistryError):
                    export_adapter(world.reg, v.ref, dest, target=target)


def test_cloudflare_target_follows_the_size_limit(world):
    config = json.loads((world.dirs["plain"] / "adapter_config.json").read_text())
    info = header_info(world.dirs["plain"] / "adapter_model.safetensors", config)
    base_config = json.loads((world.base / "config.json").read_text())
    assert "cloudflare" in export_targets(info, CLOUDFLARE_MAX_BYTES - 1, base_config, "mistral")
    assert "cloudflare" not in export_targets(info, CLOUDFLARE_MAX_BYTES, base_config, "mistral")
    assert export_targets(info, 1000, None, "mistral") == ["peft", "cloudflare", "vllm"]
    assert export_targets(info, 1000, base_config, None) == ["peft", "vllm", "gguf"]


def test_models_and_finetunes_lists_show_export_targets(world):
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig

    model = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    engine = Engine(
        EngineConfig(model="tiny-mistral"), model=model, tokenizer=world.tokenizer, registry_root=world.reg.root
    )
    app = create_app(engine, world.reg, ServerConfig(uploads_dir=world.root / "uploads"))
    with TestClient(app) as client:
        models_list = client.get("/v1/models").json()["data"]
        finetunes = client.get("/client/v4/accounts/acc/ai/finetunes").json()["result"]
    by_id = {m["id"]: m for m in models_list}
    for name, targets in EXPECTED_TARGETS.items():
        assert by_id[name]["export_targets"] == targets
        assert by_id[f"{name}@1"]["export_targets"] == targets
    assert "export_targets" not in by_id["tiny-mistral"]  # the base itself is no adapter
    assert {row["ref"]: row["export_targets"] for row in finetunes} == {
        f"{n}@1": t for n, t in EXPECTED_TARGETS.items()
    }


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_merge_and_export_gguf(world, tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    from lora_kit.cli import main

    monkeypatch.setenv("LORA_KIT_HOME", str(world.home))
    assert main(["adapters", "merge", "plain", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}

    assert main(["adapters", "export", "plain", str(tmp_path / "p.gguf"), "--target", "gguf"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "p.gguf")
    assert read_gguf(tmp_path / "p.gguf")[0]["general.type"] == "adapter"

    assert main(["adapters", "export", "dora", str(tmp_path / "d.gguf"), "--target", "gguf"]) == 2
    assert "cannot export dora@1 as GGUF: it uses DoRA" in capsys.readouterr().err
