"""The error of a run that cannot start or go on.

Below every training module, so that the trainer, the checkpoint's resume check and the task
eval's data check raise the same :class:`TrainError`.
"""

from __future__ import annotations

from lora_kit.errors import LoraKitError


class TrainError(LoraKitError):
    """Training cannot start or go on; the message says why."""
