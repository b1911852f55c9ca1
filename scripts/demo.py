"""`make demo`: the main job end to end on the embedded default model.

Grows with the toolkit: train a demo adapter from a recipe, register it, serve it,
and ask the same question with and without the adapter.
"""

from __future__ import annotations

import subprocess
import sys

QUESTION = "What is the capital of France?"


def main() -> int:
    print(f"$ lora-kit generate --model smollm2-135m-instruct {QUESTION!r}")
    out = subprocess.run(
        [sys.executable, "-m", "lora_kit", "generate", "--model", "smollm2-135m-instruct", "--max-tokens", "32", QUESTION],
        check=True, capture_output=True, text=True,
    )
    print(out.stdout.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
