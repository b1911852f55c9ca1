"""Data pipeline: labels (prompt masked, EOS supervised), formats, audit failures."""

import json

import pytest

from lora_kit.training import data
from lora_kit.training.recipe import DataSection

CONV = [{"role": "user", "content": "What is two plus two ?"}, {"role": "assistant", "content": "Four ."}]


def test_labels_mask_prompt_and_supervise_eos_even_when_pad_is_eos(word_tokenizer):
    tok = word_tokenizer
    tok.pad_token = tok.eos_token  # the classic trap: pad == eos must not unmask/mask the real EOS
    try:
        ex, truncated = data.tokenize(tok, CONV, 64)
    finally:
        tok.pad_token = None
    assert not truncated
    supervised = [t for t in ex.labels if t != data.IGNORE]
    assert tok.convert_ids_to_tokens(supervised) == ["Four", ".", "</s>"]
    assert ex.labels[: len(ex.labels) - 3] == [data.IGNORE] * (len(ex.labels) - 3)


@pytest.mark.parametrize(
    "fmt, record",
    [
        ("messages", {"messages": CONV}),
        ("prompt_completion", {"prompt": "What is two plus two ?", "completion": "Four ."}),
        ("alpaca", {"instruction": "What is two plus two", "input": "?", "output": "Four ."}),
    ],
)
def test_formats_give_the_same_conversation(word_tokenizer, fmt, record):
    cfg = DataSection(train="x", format=fmt)
    msgs = data.to_messages(record, cfg, 0)
    assert msgs[-1] == {"role": "assistant", "content": "Four ."}
    assert msgs[0]["role"] == "user" and "two plus two" in msgs[0]["content"]


def test_column_mapping_and_missing_column():
    cfg = DataSection(train="x", format="prompt_completion", columns={"prompt": "q", "completion": "a"})
    assert data.to_messages({"q": "hi", "a": "yo"}, cfg, 0)[1]["content"] == "yo"
    with pytest.raises(data.DataError, match="example 3: missing column 'q'"):
        data.to_messages({"prompt": "hi"}, cfg, 3)


def test_audit_counts_truncation_and_drops(word_tokenizer):
    cfg = DataSection(train="x", max_seq_len=20)
    long_prompt = {"messages": [{"role": "user", "content": "two " * 20}, {"role": "assistant", "content": "Four ."}]}
    ok = {"messages": CONV}
    examples, audit = data.build(word_tokenizer, [ok, long_prompt], cfg)
    assert audit.examples == 2 and audit.kept == 1
    assert audit.truncated == 1 and audit.dropped_no_supervised == 1
    assert audit.failures == []
    assert audit.supervised_tokens == 3 and audit.tokens == len(examples[0])


def test_audit_fails_without_any_supervised_token(word_tokenizer):
    cfg = DataSection(train="x")
    _, audit = data.build(word_tokenizer, [{"messages": [{"role": "user", "content": "hello"}]}], cfg)
    assert any("no supervised token" in f for f in audit.failures)


def test_local_file_types(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        assert data.load_records(str(tmp_path / f"d.{suffix}")) == rows
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(data.DataError, match="bad.jsonl:2: not valid JSON"):
        data.load_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(data.DataError, match="no such data file"):
        data.load_records(str(tmp_path / "missing.jsonl"))


def test_split_is_seeded_and_disjoint():
    records = [{"i": i} for i in range(50)]
    train1, eval1 = data.split_records(records, 0.2, seed=3)
    train2, eval2 = data.split_records(records, 0.2, seed=3)
    assert (train1, eval1) == (train2, eval2)
    assert len(eval1) == 10 and len(train1) == 40
    assert {r["i"] for r in train1}.isdisjoint({r["i"] for r in eval1})
