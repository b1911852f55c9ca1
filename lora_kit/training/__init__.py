"""Training: a recipe (``recipe``) becomes audited examples (``data``), packed rows
(``packing``), a QLoRA run with checkpoints and metrics (``trainer``, ``checkpoint``, ``metrics``,
``eval_loss``), the task metric of its adapter as served (``task_eval``) and the published adapter
(``publish``: export, lineage, registration); ``plan`` sizes the memory before any run."""
