"""TensorBoard event files for a run, when the `tensorboard` package is installed (it comes with vqtool[train]).

    tensorboard --logdir runs/        # then open http://localhost:6006

Each run writes RUN_DIR/tensorboard/: the scalars of metrics.jsonl by step, the reconstruction grids,
and a histogram of the codes the validation images use. Without the package nothing is written.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

BOARD_DIR = "tensorboard"


class Board:
    """One run's TensorBoard writer (rank 0 only), or a no-op where tensorboard is not installed."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.writer: Any = None
        if importlib.util.find_spec("tensorboard") is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops what an interrupted one logged after its last checkpoint.
        self.writer = SummaryWriter(str(run_dir / BOARD_DIR), purge_step=start_step or None)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def record(self, record: dict[str, Any], codes: torch.Tensor, num_codes: int) -> None:
        """An epoch's metrics record as scalars, and the validation codes as a histogram over 0..K-1."""
        if self.writer is None:
            return
        step = int(record["step"])
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, int | float) and np.isfinite(value):
                self.writer.add_scalar(f"{_group(key)}/{key}", value, step)
        counts = torch.bincount(codes.flatten().cpu().to(torch.int64), minlength=num_codes).to(torch.float64)
        edges = torch.arange(num_codes + 1, dtype=torch.float64) - 0.5
        self.writer.add_histogram_raw(
            "codes/validation_usage",
            min=0,
            max=num_codes - 1,
            num=int(counts.sum()),
            sum=float((counts * torch.arange(num_codes)).sum()),
            sum_squares=float((counts * torch.arange(num_codes) ** 2).sum()),
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )
        self.writer.flush()

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        """A uint8 H x W x 3 picture (the reconstruction grid)."""
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _group(key: str) -> str:
    if key.startswith("val_"):
        return "validation"
    if key in ("usage", "codes_used", "perplexity", "restarts"):
        return "codebook"
    return "train"
