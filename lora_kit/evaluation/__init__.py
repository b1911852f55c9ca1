"""Held-out evaluation through the serving engine: what users will be served, with a confidence interval.

- ``metrics``: the task metrics (``exact_match``, ``json_fields``, ``contains``), one score per
  example, and the Wilson 95% interval of a proportion (no torch: the CLI imports it at start-up);
- ``cases``: the evaluation data (the training JSONL chat format; the last assistant message is
  the reference) and its fingerprint;
- ``runner``: precisions (``fp32``, ``bf16``, ``nf4``...) as the engine loads them, and one pass
  of every case for several REFs (adapter versions and the base) through one
  :class:`~lora_kit.engine.Engine`, as concurrent greedy requests in mixed-adapter batches.

Training (finalize) and ``lora-kit eval`` both call :func:`lora_kit.evaluation.runner.evaluate`,
so the number a run reports is the number ``lora-kit eval`` prints at the same precision.
"""
