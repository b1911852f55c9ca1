"""Recipe schema: validation messages, overrides, hashing."""

from pathlib import Path

import pytest

from lora_kit.training import recipe

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"data": {"train": "x.jsonl"}, "output": {"name": "a"}}


@pytest.mark.parametrize(
    "data, message",
    [
        ({**MINIMAL, "lora": {"rank": 8}}, "unknown key 'lora.rank'; did you mean 'lora.r'?"),
        ({**MINIMAL, "trian": {}}, "unknown key 'trian'; did you mean 'train'?"),
        (
            {**MINIMAL, "train": {"learning_rte": 1e-4}},
            "unknown key 'train.learning_rte'; did you mean 'train.learning_rate'?",
        ),
        ({"data": {"train": "x"}}, "missing key 'output'"),
        ({**MINIMAL, "model": {"quantization": "int3"}}, "'model.quantization'"),
        # packed rows need a 4D attention mask, which flash_attention_2 does not take
        ({**MINIMAL, "model": {"attn_implementation": "flash_attention_2"}}, "'model.attn_implementation'"),
        (
            {**MINIMAL, "train": {"micro_batch_size": 0}},
            "'train.micro_batch_size': Input should be greater than or equal to 1",
        ),
        ({"data": {"train": "x", "eval": "y", "eval_split": 0.1}, "output": {"name": "a"}}, "exclusive"),
    ],
)
def test_bad_recipes_name_the_key(data, message):
    with pytest.raises(recipe.RecipeError) as err:
        recipe.parse(data)
    assert message in str(err.value)


def test_overrides_parse_values_as_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {train: x.jsonl}\noutput: {name: a}\n")
    r = recipe.load(
        path,
        ["train.max_steps=20", "lora.r=16", "lora.target_modules=[q_proj, v_proj]", "data.packing=false"],
        name="b",
    )
    assert (r.train.max_steps, r.lora.r, r.lora.target_modules, r.data.packing, r.output.name) == (
        20,
        16,
        ["q_proj", "v_proj"],
        False,
        "b",
    )
    with pytest.raises(recipe.RecipeError, match="unknown key 'train.max_stepz'"):
        recipe.load(path, ["train.max_stepz=3"])
    with pytest.raises(recipe.RecipeError, match="expects key.path=value"):
        recipe.load(path, ["train.max_steps"])


def test_hash_is_stable_and_sensitive():
    a, b = recipe.parse(MINIMAL), recipe.parse(MINIMAL)
    assert a.content_hash() == b.content_hash()
    c = recipe.parse({**MINIMAL, "lora": {"r": 9}})
    assert c.content_hash() != a.content_hash()


@pytest.mark.parametrize(
    "name",
    ["demo-sentiment.yaml", "demo-topic-json.yaml", "tiny-mistral-smoke.yaml", "mistral-7b-instruct-v0.1-qlora.yaml"],
)
def test_shipped_recipes_validate(name):
    r = recipe.load(ROOT / "recipes" / name)
    assert r.output.name
