"""Datasets -> token ids + labels, with an audit that catches the classic SFT bugs.

Every example is rendered by the one chat renderer (``lora_kit.chat``). Labels are
-100 everywhere except assistant replies, and the EOS that ends each reply is
supervised: labels come from the renderer's assistant mask, never from the pad id.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_kit import chat
from lora_kit.errors import LoraKitError, not_utf8
from lora_kit.training.recipe import DataSection

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


class DataError(LoraKitError, ValueError):
    """The data cannot be used for training; the message says which file/example and why."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class Audit:
    """What the data pipeline saw; ``failures`` stop the run before any training."""

    examples: int = 0
    kept: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    dropped_no_supervised: int = 0
    double_bos: int = 0
    eos_not_supervised: int = 0
    max_len: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "supervised_share": round(self.supervised_share, 4)}

    def summary(self, title: str = "data audit") -> str:
        lines = [
            f"{title}: {self.examples} examples, {self.kept} kept",
            f"  tokens {self.tokens}, supervised {self.supervised_tokens} ({self.supervised_share:.1%}), longest {self.max_len}",
            f"  truncated {self.truncated}, dropped (no supervised token) {self.dropped_no_supervised}",
            f"  double BOS {self.double_bos}, EOS not supervised {self.eos_not_supervised}",
        ]
        lines += [f"  FAILURE: {f}" for f in self.failures]
        return "\n".join(lines)


# -- loading records ---------------------------------------------------------------------------


def _read_file(path: Path) -> list[dict[str, Any]]:
    try:
        return _read_records(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({not_utf8(err)})") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON (nested too deeply)") from None


def _read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json dataset must be a list of records")
        return data
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            try:
                return list(csv.DictReader(fh))
            except csv.Error as err:
                raise DataError(f"{path}: not valid CSV ({err})") from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")


def load_records(source: str | Sequence[str], split: str = "train") -> list[dict[str, Any]]:
    """Records from local files (JSONL/JSON/CSV/Parquet) or a ``datasets`` id."""
    sources = [source] if isinstance(source, str) else list(source)
    rows: list[dict[str, Any]] = []
    for src in sources:
        path = Path(src).expanduser()
        if path.exists():
            rows.extend(_read_file(path))
            continue
        if path.suffix.lower() in {".jsonl", ".json", ".csv", ".parquet"}:
            raise DataError(f"no such data file: {src}")
        import datasets

        try:
            rows.extend(datasets.load_dataset(src, split=split))
        except Exception as err:  # datasets raises many types; the message is what matters
            raise DataError(f"could not load dataset '{src}' (split '{split}'): {err}") from err
    if not rows:
        raise DataError(f"no records in {', '.join(sources)}")
    return rows


def fingerprint(records: Sequence[dict[str, Any]]) -> str:
    """sha256 over the canonical JSON of the records (dataset lineage)."""
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps(rec, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def to_messages(record: dict[str, Any], cfg: DataSection, index: int) -> list[dict[str, Any]]:
    """One record in the recipe's format -> a chat conversation."""
    col = cfg.columns

    def get(key: str) -> Any:
        if key not in record:
            raise DataError(f"example {index}: missing column '{key}' for format '{cfg.format}'")
        return record[key]

    if cfg.format == "messages":
        messages = get(col.messages)
        if isinstance(messages, str):
            messages = json.loads(messages)
        messages = list(messages)
    elif cfg.format == "prompt_completion":
        messages = [
            {"role": "user", "content": str(get(col.prompt))},
            {"role": "assistant", "content": str(get(col.completion))},
        ]
    else:  # alpaca
        instruction, extra = str(get(col.instruction)), str(record.get(col.input) or "")
        user = instruction + ("\n\n" + extra if extra else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(get(col.output))}]
        if record.get(col.system):
            messages.insert(0, {"role": "system", "content": str(record[col.system])})
    if cfg.system_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


# -- tokenizing ----------------------------------------------------------------------------------


def tokenize(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], max_seq_len: int
) -> tuple[Example, bool]:
    """Render one conversation; returns the example and whether it was truncated."""
    rendered = chat.render(tokenizer, messages)
    ids, mask = rendered.input_ids, rendered.assistant_mask
    truncated = len(ids) > max_seq_len
    ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    return Example(ids, labels), truncated


def build(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[dict[str, Any]], cfg: DataSection, what: str = "train"
) -> tuple[list[Example], Audit]:
    """Tokenize records into examples and audit them."""
    audit = Audit(examples=len(records))
    stops = chat.stop_token_ids(tokenizer)
    bos = tokenizer.bos_token_id
    out: list[Example] = []
    for i, record in enumerate(records):
        try:
            messages = to_messages(record, cfg, i)
            example, truncated = tokenize(tokenizer, messages, cfg.max_seq_len)
        except chat.ChatError as err:
            raise DataError(f"{what} example {i}: {err}") from None
        audit.truncated += truncated
        if bos is not None and example.input_ids[:2] == [bos, bos]:
            audit.double_bos += 1
        if example.supervised == 0:
            audit.dropped_no_supervised += 1
            continue
        last = max(j for j, t in enumerate(example.labels) if t != IGNORE)
        if not truncated and example.labels[last] not in stops:
            audit.eos_not_supervised += 1
        out.append(example)
        audit.tokens += len(example)
        audit.supervised_tokens += example.supervised
        audit.max_len = max(audit.max_len, len(example))
    audit.kept = len(out)
    if audit.supervised_tokens == 0:
        audit.failures.append(f"{what}: no supervised token at all (are there assistant replies?)")
    if audit.double_bos:
        audit.failures.append(f"{what}: {audit.double_bos} examples start with a double BOS")
    if audit.eos_not_supervised:
        audit.failures.append(
            f"{what}: {audit.eos_not_supervised} replies do not end in a supervised EOS (the model would never learn to stop)"
        )
    return out, audit


def split_records(
    records: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded random hold-out split."""
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(records) * fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def load_splits(cfg: DataSection, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval records as the recipe asks (eval file, split fraction, or none)."""
    train = load_records(cfg.train, cfg.split)
    if cfg.eval is not None:
        return train, load_records(cfg.eval, cfg.split)
    return split_records(train, cfg.eval_split, seed)
