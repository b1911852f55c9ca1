"""Training: a recipe (``recipe``) becomes audited examples (``data``), packed rows
(``packing``), a QLoRA run with checkpoints (``trainer``, ``checkpoint``), evaluations
(``evaluate``) and a memory plan before any run (``plan``)."""
