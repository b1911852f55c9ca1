"""The one chat renderer: exact ids for the Mistral v0.1 format, masks, template path."""

import re

import pytest

from lora_kit import chat

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two ?"},
    {"role": "assistant", "content": "Four ."},
    {"role": "user", "content": "And three plus three ?"},
    {"role": "assistant", "content": "Six ."},
]


def ids_of(tokenizer, tokens):
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert tokenizer.unk_token_id not in ids, "test vocabulary is missing a word"
    return ids


def test_mistral_v01_exact_ids(word_tokenizer):
    tok = word_tokenizer
    out = chat.render(tok, CONVERSATION)
    # <s>[INST] system\n\nuser [/INST] answer</s>[INST] user [/INST] answer</s>
    expected_tokens = (
        ["<s>"]
        + ["[", "INST", "]", "You", "are", "terse", ".", "What", "is", "two", "plus", "two", "?", "[/", "INST", "]"]
        + ["Four", ".", "</s>"]
        + ["[", "INST", "]", "And", "three", "plus", "three", "?", "[/", "INST", "]"]
        + ["Six", ".", "</s>"]
    )
    assert out.input_ids == ids_of(tok, expected_tokens)
    expected_mask = [False] * 17 + [True] * 3 + [False] * 11 + [True] * 3
    assert out.assistant_mask == expected_mask


def test_single_bos_and_eos_after_every_reply(word_tokenizer):
    tok = word_tokenizer
    out = chat.render(tok, CONVERSATION)
    assert out.input_ids.count(tok.bos_token_id) == 1 and out.input_ids[0] == tok.bos_token_id
    eos_positions = [i for i, t in enumerate(out.input_ids) if t == tok.eos_token_id]
    assert len(eos_positions) == 2
    assert all(out.assistant_mask[i] for i in eos_positions)
    masked = tok.convert_ids_to_tokens([t for t, m in zip(out.input_ids, out.assistant_mask) if m])
    assert masked == ["Four", ".", "</s>", "Six", ".", "</s>"]


def test_generation_prompt_is_prefix_of_training_ids(word_tokenizer):
    tok = word_tokenizer
    full = chat.render(tok, CONVERSATION).input_ids
    prompt = chat.render(tok, CONVERSATION[:4], add_generation_prompt=True).input_ids
    assert full[: len(prompt)] == prompt
    assert full[len(prompt) :] == ids_of(tok, ["Six", ".", "</s>"])


def test_prompt_form_and_raw(word_tokenizer):
    tok = word_tokenizer
    assert chat.render_prompt(tok, "hello world") == ids_of(
        tok, ["<s>", "[", "INST", "]", "hello", "world", "[/", "INST", "]"]
    )
    # raw: the text goes to the tokenizer untouched (it adds no BOS of its own here)
    assert chat.render_prompt(tok, "hello world", raw=True) == ids_of(tok, ["hello", "world"])
    # a raw prompt that spells BOS itself never gets a second one
    ids = chat.render_prompt(tok, "<s> <s> hello", raw=True)
    assert ids == ids_of(tok, ["<s>", "hello"])


def test_tool_results_become_user_turns(word_tokenizer):
    tok = word_tokenizer
    msgs = [
        {"role": "user", "content": "weather"},
        {"role": "assistant", "content": "tool"},
        {"role": "tool", "content": "sunny", "name": "weather"},
    ]
    ids = chat.render(tok, msgs, add_generation_prompt=True).input_ids
    # "Result of weather: sunny" ("Result", "of", ":" are not in the test vocabulary)
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>",
        "[",
        "INST",
        "]",
        "weather",
        "[/",
        "INST",
        "]",
        "tool",
        "</s>",
        "[",
        "INST",
        "]",
        "<unk>",
        "<unk>",
        "weather",
        "<unk>",
        "sunny",
        "[/",
        "INST",
        "]",
    ]


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "wizard", "content": "x"}], "messages[0].role must be one of"),
        ([{"role": "user", "content": 3}], "messages[0].content must be a string"),
        ([{"role": "assistant", "content": "hi"}], "must follow a user message"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "only takes system messages at the start",
        ),
        ([], "must not be empty"),
    ],
)
def test_unrenderable_conversations_are_clear_errors(word_tokenizer, messages, message):
    with pytest.raises(chat.ChatError, match=re.escape(message)):
        chat.render(word_tokenizer, messages)


def test_generation_prompt_needs_a_user_turn_last(word_tokenizer):
    with pytest.raises(chat.ChatError, match="end with a user"):
        chat.render(word_tokenizer, CONVERSATION, add_generation_prompt=True)


def test_template_path_masks_exactly_the_replies():
    """The embedded model has a ChatML template: replies + <|im_end|> are supervised, the glue is not."""
    from lora_kit import models

    tok = models.load_tokenizer("smollm2-135m-instruct")
    out = chat.render(tok, CONVERSATION)
    text = tok.decode(out.input_ids)
    assert text == tok.apply_chat_template(CONVERSATION, tokenize=False)
    supervised = [t for t, m in zip(out.input_ids, out.assistant_mask) if m]
    assert tok.decode(supervised) == "Four .<|im_end|>Six .<|im_end|>"
    assert supervised.count(tok.eos_token_id) == 2
    prompt = chat.render(tok, CONVERSATION[:4], add_generation_prompt=True).input_ids
    assert out.input_ids[: len(prompt)] == prompt
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
