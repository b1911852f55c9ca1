"""Training checkpoints: adapter, optimizer, scheduler, RNG and data position.

Everything is safetensors (tensors) + JSON (the rest): nothing is pickled, so a
checkpoint can be inspected and never runs code when loaded. Each checkpoint is
written to a temp directory and renamed into place, so a kill mid-write leaves the
previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_kit.training.errors import TrainError

COMPLETE = "complete.json"


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], seen: dict[int, Any] | None = None) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key}, collecting them.

    A tensor that appears more than once (bitsandbytes' 8-bit optimizers share one quantization
    map between all their parameters' states) is stored once and referenced by every use; a
    different tensor on the same memory is copied (safetensors refuses shared memory).
    """
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return {"__tensor__": seen[id(obj)][0]}
        key = f"{prefix}"
        tensor = obj.detach().cpu().contiguous()
        storages = seen.setdefault(-1, ("", set()))[1]
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
        seen[id(obj)] = (key, obj)  # obj kept alive: its id cannot be reused by another tensor meanwhile
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_split(k, f"{prefix}.k{i}", tensors, seen), _split(v, f"{prefix}.{i}", tensors, seen)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        return {
            "__list__" if isinstance(obj, list) else "__tuple__": [
                _split(v, f"{prefix}.{i}", tensors, seen) for i, v in enumerate(obj)
            ]
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    import numpy as np

    if isinstance(obj, np.ndarray):  # numpy's RNG state
        data = _split(torch.from_numpy(obj.astype(np.int64)), prefix, tensors, seen)
        return {"__ndarray__": obj.dtype.str, "data": data}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_join(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return _join(obj["data"], tensors).numpy().astype(obj["__ndarray__"])
    return obj


def save_state(path: Path, name: str, state: Any) -> None:
    """Save a nested state (dicts/lists of tensors and plain values) as NAME.safetensors + NAME.json."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, name, tensors)
    save_file(tensors, str(path / f"{name}.safetensors"))
    (path / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(path: Path, name: str, device: torch.device | str = "cpu") -> Any:
    tensors = load_file(str(path / f"{name}.safetensors"), device=str(device))
    return _join(json.loads((path / f"{name}.json").read_text()), tensors)


def rng_state() -> dict[str, Any]:
    """This process's random states (python, numpy, torch CPU and CUDA)."""
    import numpy as np

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": list(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


def save(
    run_dir: Path,
    step: int,
    adapter_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` complete ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}-", dir=root))
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter_state.items()}, str(tmp / "adapter.safetensors"))
    save_state(tmp, "optimizer", optimizer_state)
    save_state(tmp, "rng", rng_states)
    (tmp / "scheduler.json").write_text(json.dumps(scheduler_state))
    (tmp / COMPLETE).write_text(json.dumps({**meta, "step": step}))
    return _install(tmp, run_dir, step, keep)


def _install(tmp: Path, run_dir: Path, step: int, keep: int) -> Path:
    """Rename the finished checkpoint ``tmp`` into place (atomic: a kill leaves the previous one
    the latest), then keep only the ``keep`` newest."""
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_complete(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- sharded (FSDP) checkpoints: one directory per rank, the rest as above -----------------------
# A sharded checkpoint is written in three steps, with a barrier between them (the trainer's):
# rank 0 creates the temp directory (begin_sharded), every rank writes its shard (save_shard),
# rank 0 adds the shared files and renames it into place (commit_sharded). A kill at any point
# leaves the previous complete checkpoint as the latest.


def sharded_tmp(run_dir: Path, step: int) -> Path:
    """The temp directory of sharded checkpoint ``step`` (a fixed name: every rank must find it)."""
    return run_dir / "checkpoints" / f".step-{step:07d}-shards"


def begin_sharded(tmp: Path) -> None:
    """Rank 0: an empty temp directory for the shards (a leftover from a killed run is dropped)."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def _rank_dir(path: Path, rank: int) -> Path:
    return path / f"rank-{rank:05d}"


def save_shard(
    tmp: Path, rank: int, adapter_shard: dict[str, torch.Tensor], optimizer_shard: dict[str, Any], rng: dict[str, Any]
) -> None:
    """This rank's local shards of the LoRA weights and optimizer state, and its RNG state."""
    out = _rank_dir(tmp, rank)
    out.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter_shard.items()}, str(out / "adapter.safetensors"))
    save_state(out, "optimizer", optimizer_shard)
    save_state(out, "rng", rng)


def commit_sharded(
    tmp: Path, run_dir: Path, step: int, scheduler_state: dict[str, Any], meta: dict[str, Any], keep: int = 2
) -> Path:
    """Rank 0, after every rank saved its shard: the schedule and metadata, then the atomic rename."""
    (tmp / "scheduler.json").write_text(json.dumps(scheduler_state))
    (tmp / COMPLETE).write_text(json.dumps({**meta, "step": step}))
    return _install(tmp, run_dir, step, keep)


def load_shard(path: Path, rank: int) -> dict[str, Any]:
    """What rank ``rank`` needs to resume from sharded checkpoint ``path`` (same keys as :func:`load`,
    with this rank's shards and its own RNG state), on the CPU: the trainer copies each shard into
    its parameter's (or optimizer state's) device."""
    shard = _rank_dir(path, rank)
    return {
        "meta": json.loads((path / COMPLETE).read_text()),
        "adapter": load_file(str(shard / "adapter.safetensors"), device="cpu"),
        "optimizer": load_state(shard, "optimizer"),
        "scheduler": json.loads((path / "scheduler.json").read_text()),
        "rng": load_state(shard, "rng"),
    }


def list_complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written temp dirs are ignored)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / COMPLETE).exists())


def latest(run_dir: Path) -> Path | None:
    found = list_complete(run_dir)
    return found[-1] if found else None


def check_resume_layout(ckpt_path: Path, strategy: str, world: int) -> None:
    """Refuse to resume a sharded (FSDP) checkpoint on another world size or strategy, or a
    replicated (none/ddp) one under FSDP: each rank's shard fits only the layout that wrote it."""
    saved = json.loads((ckpt_path / COMPLETE).read_text())
    saved_strategy = saved.get("strategy", "none/ddp")  # replicated checkpoints predate the key
    if strategy != "fsdp" and saved_strategy != "fsdp":
        return
    if saved_strategy != strategy:
        raise TrainError(
            f"{ckpt_path} was written by a {saved_strategy} run, this run is {strategy}: resume with "
            f"train.distributed: {saved_strategy.split('/')[-1]}, or start over with --fresh"
        )
    if saved["world_size"] != world:
        raise TrainError(
            f"{ckpt_path} holds FSDP shards of {saved['world_size']} processes, this run has {world}: resume "
            f"with {saved['world_size']} processes (--nproc_per_node / --num_processes), or start over with --fresh"
        )


def load(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Everything a resume needs from checkpoint ``path``."""
    return {
        "meta": json.loads((path / COMPLETE).read_text()),
        "adapter": load_file(str(path / "adapter.safetensors"), device=str(device)),
        "optimizer": load_state(path, "optimizer", device),
        "scheduler": json.loads((path / "scheduler.json").read_text()),
        "rng": load_state(path, "rng"),
    }
