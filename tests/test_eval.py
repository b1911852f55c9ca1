"""Evaluation through the serving engine: metrics with exact values, Wilson intervals, several REFs in one
pass, `lora-kit eval` against the server's answers, training's reported score against `lora-kit eval`,
and eval results kept per version in the registry (also in registries made before the table existed)."""

import json
import sqlite3
from pathlib import Path

import pytest

from lora_kit.evaluation import cases as cases_mod
from lora_kit.evaluation import metrics, runner
from lora_kit.evaluation.metrics import EvalError, Score

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-eval"  # the name the test server serves the tiny Mistral under
MAX_TOKENS = 6

# -- metrics -------------------------------------------------------------------------------------

ORDER = '{"item": "tea", "qty": 2, "size": "large", "rush": false}'


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('{ "qty":2,  "rush": false,\n "item":"tea","size":"large" }', Score(True, 4, 4)),  # reordered, spaced
        ('{"item": "tea", "qty": 2.0, "size": "large", "rush": false}', Score(True, 4, 4)),  # 2.0 is 2
        ('{"item": "tea", "qty": 3, "size": "large", "rush": false}', Score(False, 3, 4)),  # one wrong field
        ('{"item": "tea", "qty": 2, "size": "large", "rush": 0}', Score(False, 3, 4)),  # 0 is not false
        ('{"item": "tea", "qty": 2, "size": "large"}', Score(False, 3, 4)),  # a field missing
        ('{"item": "tea", "qty": 2, "size": "large", "rush": false, "note": ""}', Score(False, 4, 4)),  # extra key
        ('{"item": "tea", "qty": 2, "size": "large", "rush": false', Score(False, 0, 4)),  # invalid JSON
        ('["tea", 2, "large", false]', Score(False, 0, 4)),  # JSON, not an object
        ("Sure! Here it is: " + ORDER, Score(False, 0, 4)),  # chatter around the JSON is not JSON
    ],
)
def test_json_fields_on_hand_made_pairs(answer, expected):
    assert metrics.score_json_fields(answer, ORDER) == expected


def test_json_fields_summary_counts_records_and_fields():
    answers = ['{"qty": 2, "item": "tea", "size": "large", "rush": false}', '{"item": "tea"}', "not json"]
    result = metrics.summarize("json_fields", metrics.score_all("json_fields", answers, [ORDER] * 3))
    assert (result.n, result.correct, result.fields_right, result.fields_total) == (3, 1, 5, 12)
    assert result.score == pytest.approx(1 / 3) and result.field_score == pytest.approx(5 / 12)
    assert result.ci == metrics.wilson_interval(1, 3) and result.field_ci == metrics.wilson_interval(5, 12)
    with pytest.raises(EvalError, match="json_fields needs references that are JSON objects"):
        metrics.score_json_fields("{}", "positive")


def test_exact_match_and_contains():
    assert metrics.score_exact_match("  Four \n .", "Four .") == Score(True)
    assert metrics.score_exact_match("four .", "Four .") == Score(False)
    assert metrics.score_contains("It is  Four . Sure", "Four .") == Score(True)
    assert metrics.score_contains("Five", "Four") == Score(False)
    with pytest.raises(EvalError, match="unknown metric 'bleu'"):
        metrics.score_all("bleu", ["a"], ["a"])


def test_wilson_interval_known_values():
    # 0 of 10: the upper bound is z^2 / (n + z^2) = 3.8415 / 13.8415; 10 of 10 mirrors it.
    assert metrics.wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert metrics.wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    # 8 of 10 and 63 of 80 (the 78.8%), computed from Wilson's formula (8 of 10: the (0.490, 0.943) of textbooks).
    assert metrics.wilson_interval(8, 10) == pytest.approx((0.490162, 0.943318), abs=1e-6)
    assert metrics.wilson_interval(63, 80) == pytest.approx((0.685778, 0.862876), abs=1e-6)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)


def test_cases_from_the_training_chat_format(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        },
        {"prompt": "P", "completion": "C"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = cases_mod.load_cases(path)
    assert [(c.messages, c.reference) for c in got] == [
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "A"),
        ([{"role": "user", "content": "P"}], "C"),
    ]
    assert len(cases_mod.load_cases(path, max_examples=1)) == 1
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}]}) + "\n")
    with pytest.raises(EvalError, match="d.jsonl:1: no assistant message"):
        cases_mod.load_cases(path)


# -- through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_mistral_dir):
    """A registry with two versions of ``a`` on the tiny Mistral, and a data file of chat cases."""
    from helpers import make_adapter

    from lora_kit.registry import Registry

    root = tmp_path_factory.mktemp("eval")
    registry = Registry(root / "home" / "registry")
    for seed in (1, 2):
        adapter = make_adapter(tiny_mistral_dir, root / f"adapter-{seed}", seed=seed)
        registry.register(adapter, "a", base_model=str(tiny_mistral_dir))
    data = root / "chat.jsonl"
    convs = [
        [("user", "What is two plus two ?"), ("assistant", "Four .")],
        [("system", "You are terse."), ("user", "And three plus three ?"), ("assistant", "Six .")],
        [("user", "hello world"), ("assistant", "hello")],
        [("user", "What is two plus two ?"), ("assistant", "Four ."), ("user", "And three ?"), ("assistant", "Six .")],
    ]
    data.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in m]}) + "\n" for m in convs))
    return {"root": root, "registry": registry, "data": data, "model": str(tiny_mistral_dir)}


def _evaluate(world, refs):
    return runner.evaluate(
        world["model"],
        refs,
        cases_mod.load_cases(world["data"]),
        metric="contains",
        precision="fp32",
        max_tokens=MAX_TOKENS,
        registry_root=world["registry"].root,
    )


def test_three_refs_in_one_pass_equal_one_at_a_time(world):
    together = _evaluate(world, ["a@1", "a@2", "base"])
    for r in together.results:
        alone = _evaluate(world, [r.ref]).results[0]
        assert (alone.key, alone.answers, alone.token_ids, alone.result) == (r.key, r.answers, r.token_ids, r.result)
    assert [r.key for r in together.results] == ["a@1", "a@2", "base"]
    # The adapters change the answers (else the comparison above proves nothing).
    assert together.result("a@1").token_ids != together.result("base").token_ids
    assert together.result("a@1").token_ids != together.result("a@2").token_ids
    assert all(len(ids) <= MAX_TOKENS for r in together.results for ids in r.token_ids)


def test_cli_eval_at_fp32_equals_the_servers_answers(world, monkeypatch, capsys):
    """`lora-kit eval --json` answers what a server over the fp32 base answers, token for token; each
    adapter's result is kept in the registry and shown by `adapters show`."""
    from fastapi.testclient import TestClient

    from lora_kit import cli, models
    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig

    monkeypatch.setenv("LORA_KIT_HOME", str(world["root"] / "home"))
    argv = ["eval", "a@1", "base", "--data", str(world["data"]), "--precision", "fp32"]
    assert cli.main([*argv, "--max-tokens", str(MAX_TOKENS), "--metric", "contains", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["precision"], report["n"], report["metric"]) == ("fp32", 4, "contains")
    assert report["data_sha256"] == cases_mod.file_sha256(world["data"])

    model = models.load_model(world["model"], "none", compute_dtype=__import__("torch").float32)
    engine = Engine(EngineConfig(MODEL, weight_dtype="float32"), model=model,  # "fp32": exact, as the eval's
                    tokenizer=models.load_tokenizer(world["model"]), registry_root=world["registry"].root)  # fmt: skip
    engine.start()
    try:
        with TestClient(
            create_app(engine, world["registry"], ServerConfig(uploads_dir=world["root"] / "uploads"))
        ) as client:
            for result in report["results"]:
                lora = {} if result["ref"] == "base" else {"lora": result["ref"]}
                answers = zip(result["answers"], result["answer_tokens"], strict=True)
                for case, (answer, tokens) in zip(cases_mod.load_cases(world["data"]), answers, strict=True):
                    body = {"messages": case.messages, "max_tokens": MAX_TOKENS, "temperature": 0, **lora}
                    reply = client.post(f"/client/v4/accounts/acc/ai/run/{MODEL}", json=body).json()["result"]
                    assert (reply["response"], reply["usage"]["completion_tokens"]) == (answer, tokens)
    finally:
        engine.stop(10)
    assert report["results"][0]["answers"] != report["results"][1]["answers"]  # the adapter answers otherwise

    records = world["registry"].evals("a@1")
    assert [(e.metric, e.precision, e.n, e.data_sha256) for e in records][-1] == (
        "contains",
        "fp32",
        4,
        report["data_sha256"],
    )
    assert records[-1].score == report["results"][0]["score"]
    assert cli.main(["adapters", "show", "a@1"]) == 0
    assert f"contains {report['results'][0]['score']:.1%}" in capsys.readouterr().out
    assert cli.main(["adapters", "show", "a@1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["evals"][-1]
    assert (shown["ref"], shown["metric"], shown["precision"], shown["n"]) == ("a@1", "contains", "fp32", 4)


def test_cli_eval_errors_are_one_line(world, monkeypatch, capsys):
    from lora_kit import cli

    monkeypatch.setenv("LORA_KIT_HOME", str(world["root"] / "home"))
    assert cli.main(["eval", "b@1", "--data", str(world["data"])]) == 2
    assert "no adapter 'b'" in capsys.readouterr().err
    assert cli.main(["eval", "a@1", "--data", str(world["root"] / "missing.jsonl")]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert cli.main(["eval", "a@1", "--data", str(world["data"]), "--metric", "json_fields"]) == 2
    assert "json_fields needs references that are JSON objects" in capsys.readouterr().err


# -- the registry ------------------------------------------------------------------------------


def test_registry_made_before_the_evals_table_keeps_working(world, tmp_path):
    from lora_kit.registry import Registry

    registry = Registry(tmp_path / "registry")
    adapter = world["registry"].adapter_path("a@1")
    registry.register(adapter, "old")
    with sqlite3.connect(registry.db_path) as db:  # as a registry of the previous release was
        db.execute("DROP TABLE evals")
    reopened = Registry(tmp_path / "registry")
    assert reopened.evals("old") == []
    kept = reopened.record_eval("old", metric="exact_match", score=0.5, n=4, ci=(0.15, 0.85),
                                data_sha256="ab" * 32, precision="nf4", data_name="d.jsonl")  # fmt: skip
    assert reopened.evals("old@1") == [kept]
    assert (kept.ref, kept.score, kept.ci, kept.precision) == ("old@1", 0.5, (0.15, 0.85), "nf4")
    reopened.remove("old")
    with sqlite3.connect(registry.db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM evals").fetchone() == (0,)


# -- training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentiment_base(tmp_path_factory):
    """A tiny random Mistral whose word-level vocabulary covers the sentiment data (as test_train's)."""
    from helpers import make_tiny_mistral, make_tokenizer

    texts = [
        m["content"]
        for f in ("train", "eval")
        for line in (ROOT / "data" / "sentiment" / f"{f}.jsonl").read_text().splitlines()
        for m in json.loads(line)["messages"]
    ]
    return make_tiny_mistral(tmp_path_factory.mktemp("sentiment-base"), make_tokenizer(texts))


def test_training_reports_what_lora_kit_eval_measures(tmp_path, sentiment_base, monkeypatch, capsys):
    """The run's score at the serving precision (fp32 on the CPU, bf16w where it multiplies bf16
    natively) and at its training precision (nf4) equal `lora-kit eval` of the registered version
    on the same file, answer for answer."""
    from lora_kit import cli
    from lora_kit.registry import Registry
    from lora_kit.training import recipe as recipe_mod
    from lora_kit.training.trainer import train

    monkeypatch.setenv("LORA_KIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    overrides = ["train.max_steps=6", "train.checkpoint_every=0", "train.eval_every=0", "eval.max_examples=6"]
    r = recipe_mod.load(ROOT / "recipes" / "tiny-mistral-smoke.yaml", [f"model.base={sentiment_base}", *overrides])
    r.output.run_dir = str(tmp_path / "run")
    lines: list[str] = []
    result = train(r, log=lines.append)
    task = result.metrics["task_eval"]
    served = runner.serving_precision()
    assert served in ("fp32", "bf16w")
    assert (task["serving_precision"], task["training_precision"], task["n"]) == (served, "nf4", 6)
    assert task["data_sha256"] == cases_mod.file_sha256(ROOT / "data" / "sentiment" / "eval.jsonl")
    assert result.metrics["eval_exact_match"] == task["results"][served]["adapter"]["score"]
    text = "\n".join(lines)
    assert f"{served}, as served" in text and "nf4, as trained" in text
    ran = json.loads((result.run_dir / "task_eval.json").read_text())

    for precision in (served, "nf4"):
        argv = ["eval", result.ref, "base", "--data", "data/sentiment/eval.jsonl", "--max-examples", "6"]
        assert cli.main([*argv, "--max-tokens", "4", "--precision", precision, "--json"]) == 0
        measured = json.loads(capsys.readouterr().out)
        assert measured["results"][0]["score"] == task["results"][precision]["adapter"]["score"]
        assert measured["results"][1]["score"] == task["results"][precision]["base"]["score"]
        for by_cli, by_training in zip(measured["results"], ran[precision]["results"], strict=True):
            assert by_cli["answers"] == by_training["answers"]
    kept = Registry().evals(result.ref)
    assert [e.precision for e in kept] == [served, "nf4", served, "nf4"]  # training's two, then the CLI's
    assert kept[0].score == kept[2].score and kept[1].score == kept[3].score
    assert len({e.data_sha256 for e in kept}) == 1
    lineage = Registry().resolve(result.ref).lineage
    assert lineage["metrics"]["task_eval"]["results"]["nf4"] == task["results"]["nf4"]


def test_training_refuses_held_out_replies_the_metric_cannot_score(tmp_path, sentiment_base, monkeypatch):
    """json_fields on plain-text replies fails at setup, before any step, not after training."""
    from lora_kit.training import recipe as recipe_mod
    from lora_kit.training.trainer import Trainer, TrainError

    monkeypatch.setenv("LORA_KIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    overrides = [f"model.base={sentiment_base}", "eval.task_metric=json_fields"]
    r = recipe_mod.load(ROOT / "recipes" / "tiny-mistral-smoke.yaml", overrides)
    r.output.run_dir = str(tmp_path / "run")
    trainer = Trainer(r, log=lambda _msg: None)
    with pytest.raises(TrainError, match="eval.task_metric json_fields: json_fields needs references that are JSON"):
        trainer.setup()
    assert not hasattr(trainer, "model")  # stopped before the model was loaded
