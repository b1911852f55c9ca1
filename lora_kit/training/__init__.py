"""Training: a recipe (``recipe``) becomes audited examples (``data``), packed rows
(``packing``), a QLoRA run with checkpoints and metrics (``trainer``, ``checkpoint``, ``metrics``), the eval loss
(``eval_loss``) and a memory plan before any run (``plan``)."""
