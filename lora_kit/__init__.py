"""lora-kit: QLoRA recipes, a versioned adapter registry, and a multi-adapter server."""

__version__ = "0.1.0"
