import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# One shared home for the whole session so the embedded model is converted once
# (the Makefile points LORA_KIT_HOME at .lora-kit-home; run directly, pytest uses the same
# directory, so the converted model is shared with `make test` and `make demo`).
if "LORA_KIT_HOME" not in os.environ:
    os.environ["LORA_KIT_HOME"] = str(Path(__file__).resolve().parent.parent / ".lora-kit-home")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


CHAT_TEXTS = [
    "You are terse.",
    "What is two plus two ?",
    "Four .",
    "And three plus three ?",
    "Six .",
    "hello world tool result weather sunny",
]


@pytest.fixture(scope="session")
def word_tokenizer():
    from helpers import make_tokenizer

    return make_tokenizer(CHAT_TEXTS)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, word_tokenizer):
    from helpers import make_tiny_mistral

    return make_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"), word_tokenizer)


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded default (SmolLM2-135M-Instruct), full precision, loaded once per session."""
    from lora_kit import models

    return models.load("smollm2-135m-instruct", quantization="none")
