"""The PEFT LoRA adapter format: files, tensor keys, config rules (``format``) and the
header-only validation that checks an adapter directory against itself and its base
(``validation``). The registry, the engine, the server and the exports all ask here."""

from lora_kit.adapters.format import (
    ADAPTER_FILES,
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    InvalidAdapter,
    parse_config,
)

__all__ = ["ADAPTER_FILES", "CONFIG_FILE", "PICKLE_SUFFIXES", "WEIGHTS_FILE", "InvalidAdapter", "parse_config"]
