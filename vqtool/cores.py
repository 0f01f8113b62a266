"""How a file pipeline shares the CPU cores between I/O worker processes and inference threads."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vqtool.errors import VqtoolError


@dataclass(frozen=True)
class CoreSplit:
    """Worker processes that read (or write) image files, and ONNX Runtime's intra-op threads."""

    workers: int
    threads: int


def split_cores(workers: int | None = None, threads: int | None = None, cores: int | None = None) -> CoreSplit:
    """Half the cores for file workers, the rest for inference, unless either is given.

    Disjoint, because both stages are CPU-bound: with file workers and inference threads fighting
    over the same cores, neither stage runs at its own speed. On 2 cores (32x32 PNGs) one reader and
    one inference thread encoded 15.5k images/s with the INT8 encoder against 12.6k with two threads,
    and kept the pipeline at the speed of its slower stage. An FP32 encoder, whose second thread
    helps it more, gained back ~20% with --threads 2 there; the option is for such tuning.
    """
    for name, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and value < 1:
            raise VqtoolError(f"{name} must be at least 1, got {value}")
    cores = cores or os.cpu_count() or 1
    chosen_workers = workers or max(1, min(16, cores // 2))
    return CoreSplit(chosen_workers, threads or max(1, cores - chosen_workers))
