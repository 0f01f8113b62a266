"""The data a checkpoint was trained on, read again as its run read it: for export's INT8 calibration and parity."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from vqtool.data.specs import collection_exists
from vqtool.model.checkpoint import Checkpoint
from vqtool.train.data.memory import TrainingData
from vqtool.train.data.streaming import load_training_set


def _training_data(checkpoint: Checkpoint, log: Callable[[str], None]) -> Path | None:
    """The data the checkpoint was trained on, or None for the embedded default data (also when it is gone)."""
    source = Path(checkpoint.data) if checkpoint.data else None
    if source is not None and not collection_exists(source):
        log(f"training data {source} is gone; using the embedded default images instead")
        source = None
    return source


def training_set_of(checkpoint: Checkpoint, log: Callable[[str], None]) -> TrainingData:
    """The data the checkpoint was trained on, read as its run read it (--max-pixels, --skip-bad, --val-data)."""
    config = checkpoint.train_config
    source = _training_data(checkpoint, log)
    val_data = config.val_data if source is not None else None
    if val_data is not None and not collection_exists(val_data):
        log(f"validation data {val_data} is gone; using the held-out part of {source} instead")
        val_data = None
    return load_training_set(
        source,
        checkpoint.model_config.image_size,
        max_pixels=config.max_pixels,
        skip_bad=config.skip_bad,
        val_data=val_data,
        log=log,
    )


def held_out_images(checkpoint: Checkpoint, log: Callable[[str], None]) -> np.ndarray:
    """The validation split of the data the checkpoint was trained on (the default data if that is gone)."""
    return training_set_of(checkpoint, log).val
