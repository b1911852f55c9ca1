"""Write a random-weight Mistral checkpoint of a true shape: ``--shape NAME OUT``.

The weights are random (the code paths and the memory are what is tested, not the quality);
everything else is what ``mistralai/Mistral-7B-Instruct-v0.1`` ships:

- ``config.json``: v0.1's config, value for value (``V01_CONFIG`` below). Sources: the values
  issue #23 lists (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab
  32000); Mistral's reference parameter table for 7B v0.1 (dim 4096, n_layers 32, head_dim 128,
  hidden_dim 14336, n_heads 32, n_kv_heads 8, window_size 4096, vocab 32000; e.g. the README of
  sumitdotml/transformers ``mistral-7b-v0.1``); ``transformers.MistralConfig``'s defaults, which
  are taken from v0.1 (silu, initializer_range 0.02, rope_theta 10000.0, sliding_window 4096,
  bos 1, eos 2, untied embeddings). What differs from those defaults is as v0.1's ``config.json``
  on the hub has it, as stated in the brief of issue #23 (no copy of the file was in the
  reference corpus to check against): ``max_position_embeddings`` 32768 (the default is 131072),
  ``rms_norm_eps`` 1e-05 (the default is 1e-06), ``torch_dtype`` bfloat16, ``use_cache`` true.
  The file is
  written as v0.1 has it (``rope_theta`` and ``torch_dtype`` at the top level), not re-saved
  through transformers, which would rename them.
- The tokenizer: v0.1's own SentencePiece model (``tokenizer.model.v1`` from the PyPI package
  ``mistral-common`` 1.13.1, Apache-2.0, kept in ``scripts/data/mistral-7b-v0.1-tokenizer.model``,
  sha256 ``TOKENIZER_SHA256``), copied as ``tokenizer.model`` and converted to a transformers
  ``LlamaTokenizer`` (``tokenizer.json``) with no hub download and no ``sentencepiece``: the
  model file is read by the small protobuf reader below, the BPE merges come from the pieces'
  scores as transformers' own converter does. It encodes
  ``[INST] What is your favourite condiment? [/INST]`` to the ids transformers' Mistral docs show.
- The chat format: no ``chat_template`` is written, so ``lora_kit.chat.render`` uses its
  built-in v0.1 format (BOS once, ``[INST] ... [/INST]``, EOS after each reply), the one
  ``mistral_common`` tokenizes. A Jinja template would tokenize ``<s>[INST]`` as ``<s>`` + ``[``
  (28792) where mistral_common has ``▁[`` (733).

Weights are bf16 safetensors shards (``model-0000N-of-0000M.safetensors`` and
``model.safetensors.index.json``), written one tensor at a time: the shard headers are planned
from the shapes first, then each tensor is drawn, written and freed, so memory stays at one
tensor whatever the model's size (the largest, the 32000x4096 embedding, is drawn in fp32: about
1.1 GB peak RSS for any Mistral-7B shape, measured with mistral-7b-2layers). Linear and embedding
weights are normal(0, 0.02) (v0.1's ``initializer_range``), norms are 1. Each tensor has its own generator,
seeded from ``--seed`` and its name, so a seed gives the same bytes on every run.

    python scripts/make_random_model.py --list-shapes
    python scripts/make_random_model.py --shape mistral-7b /data/mistral-7b-random   # 14.5 GB
    python scripts/make_random_model.py --shape mistral-7b --config-only OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"
TOKENIZER_MODEL = DATA / "mistral-7b-v0.1-tokenizer.model"
TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

V01_CONFIG: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}

SHAPES: dict[str, dict[str, Any]] = {
    "mistral-7b": {},
    "mistral-7b-2layers": {"num_hidden_layers": 2},
    # For CI: the true vocabulary (so the real tokenizer fits), everything else small.
    "mistral-tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}

MAX_SHARD_BYTES = 4 * 2**30
STD = 0.02
BF16_BYTES = 2


def shape_config(name: str) -> dict[str, Any]:
    """The config.json of a shape: v0.1's with the shape's changes."""
    if name not in SHAPES:
        raise SystemExit(f"unknown shape '{name}'; one of: {', '.join(SHAPES)}")
    return {**V01_CONFIG, **SHAPES[name]}


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a MistralForCausalLM, in checkpoint order, with its shape."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def nbytes(shape: tuple[int, ...]) -> int:
    n = BF16_BYTES
    for d in shape:
        n *= d
    return n


def plan_shards(
    tensors: list[tuple[str, tuple[int, ...]]], max_bytes: int = MAX_SHARD_BYTES
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors in order into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        if shards[-1] and size + nbytes(shape) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    return shards


def _header(shard: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """A safetensors header (length prefix included) for these tensors, laid out in order."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shard:
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> Any:
    """The bf16 tensor ``name``: ones for norms, normal(0, STD) otherwise; its own seeded generator."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, STD, generator=gen).to(torch.bfloat16)


def write_weights(out: Path, config: dict[str, Any], seed: int, max_bytes: int = MAX_SHARD_BYTES) -> None:
    import torch

    shards = plan_shards(tensor_shapes(config), max_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with open(out / fname, "wb") as f:
            f.write(_header(shard))
            for name, shape in shard:
                tensor = random_tensor(name, shape, seed)
                f.write(tensor.view(-1).view(torch.uint8).numpy().data)
                del tensor
                weight_map[name] = fname
                total += nbytes(shape)
        print(f"wrote {fname} ({sum(nbytes(s) for _, s in shard) / 1e9:.2f} GB)", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# -- the tokenizer: SentencePiece model -> transformers LlamaTokenizer, without sentencepiece ----


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message; bytes for length-delimited fields."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((field, wire, value))
    return out


def sentencepiece_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of each piece of a SentencePiece model (ModelProto.pieces, field 1)."""
    pieces = []
    for field, _, value in _fields(path.read_bytes()):
        if field != 1:
            continue
        piece, score, kind = "", 0.0, 1
        for f, _, v in _fields(value):
            if f == 1:
                piece = v.decode("utf-8")
            elif f == 2:
                score = struct.unpack("<f", v)[0]
            elif f == 3:
                kind = v
        pieces.append((piece, score, kind))
    return pieces


def write_tokenizer(out: Path) -> None:
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    if hashlib.sha256(TOKENIZER_MODEL.read_bytes()).hexdigest() != TOKENIZER_SHA256:
        raise SystemExit(f"{TOKENIZER_MODEL} is not mistral-common's tokenizer.model.v1 (sha256 differs)")
    pieces = sentencepiece_pieces(TOKENIZER_MODEL)
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    merges = generate_merges(vocab, {piece: score for piece, score, _ in pieces})
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=False)
    tok.model_max_length = V01_CONFIG["max_position_embeddings"]
    tok.save_pretrained(str(out))
    shutil.copyfile(TOKENIZER_MODEL, out / "tokenizer.model")


def write_config(out: Path, config: dict[str, Any]) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def make(shape: str, out: Path, seed: int = 0, config_only: bool = False, max_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the checkpoint of ``shape`` into ``out`` (a new or empty directory)."""
    config = shape_config(shape)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    write_config(out, config)
    if config_only:
        return out
    need = sum(nbytes(s) for _, s in tensor_shapes(config)) + 2 * 2**20 * 10
    free = shutil.disk_usage(out).free
    if free < need:
        raise SystemExit(f"{shape} needs {need / 1e9:.1f} GB on disk; {out} has {free / 1e9:.1f} GB free")
    write_tokenizer(out)
    write_weights(out, config, seed, max_bytes)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", type=Path, help="output directory (new or empty)")
    ap.add_argument("--shape", default="mistral-7b", help=f"one of: {', '.join(SHAPES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config-only", action="store_true", help="write config.json and generation_config.json only")
    ap.add_argument("--list-shapes", action="store_true")
    args = ap.parse_args(argv)
    if args.list_shapes:
        for name in SHAPES:
            config = shape_config(name)
            tensors = tensor_shapes(config)
            params = sum(nbytes(s) for _, s in tensors) // BF16_BYTES
            shards = len(plan_shards(tensors))
            print(f"{name:20} {params / 1e6:9.1f}M params  {params * BF16_BYTES / 1e9:6.2f} GB bf16  {shards} shard(s)")
        return 0
    if args.out is None:
        ap.error("OUT is required")
    make(args.shape, args.out, args.seed, args.config_only)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
