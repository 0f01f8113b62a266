"""Training from Python: start a run from a preset and options, or resume one, as `vqtool train` does.

from vqtool.train.run import new_run, resume_run, train
result = train(new_run(preset="f8", steps=1500))
result = train(resume_run(result.run_dir, steps=3000))
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqtool.data.specs import collection_exists
from vqtool.errors import VqtoolError
from vqtool.formats.lock import OutputLock
from vqtool.images.reading import describe_skipped
from vqtool.model.checkpoint import CheckpointError, load_checkpoint
from vqtool.model.config import ModelConfig, TrainConfig
from vqtool.model.presets import DEFAULT_PRESET, preset_settings
from vqtool.train.board import BOARD_DIR
from vqtool.train.data.memory import TrainingData
from vqtool.train.data.streaming import load_training_set
from vqtool.train.loop import CHECKPOINT_NAME, FIGURES_DIR, METRICS_NAME, RunResult, TrainingStopped, fit

RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class RunPlan:
    """A run about to train: its configurations, its folder, its data, and whether it continues a checkpoint."""

    model_config: ModelConfig
    train_config: TrainConfig
    run_dir: Path
    data: Path | None  # None: the embedded default photographs
    resume: bool = False


def next_run_dir(root: Path = RUNS_ROOT) -> Path:
    """runs/run-001, runs/run-002, ...: a new run never lands on an old one."""
    taken = {p.name for p in root.glob("run-*")} if root.is_dir() else set()
    number = 1
    while f"run-{number:03d}" in taken:
        number += 1
    return root / f"run-{number:03d}"


def new_run(
    *,
    preset: str = DEFAULT_PRESET,
    data: Path | None = None,
    out: Path | None = None,
    image_size: int = 32,
    **options: Any,
) -> RunPlan:
    """A new run from `preset`, overridden by `options` that are not None: any ModelConfig or TrainConfig field
    (codes, dim, channels, steps, lr, ...). `out` defaults to the next free runs/run-NNN."""
    try:
        model_fields, train_fields = preset_settings(preset, options)
        model_config = ModelConfig(image_size=image_size, **model_fields)
        train_config = TrainConfig(**train_fields)
    except (TypeError, ValueError) as exc:
        raise VqtoolError(str(exc)) from None
    run_dir = out or next_run_dir()
    if (run_dir / CHECKPOINT_NAME).exists():
        raise VqtoolError(f"already holds a run; continue it with --resume {run_dir} or pick another --out", run_dir)
    _check_run_folder(run_dir)
    return RunPlan(model_config, train_config, run_dir, data)


# What a run writes in its folder: a folder that holds anything else is not a run's, and a new run stays out of it.
RUN_ENTRIES = frozenset({CHECKPOINT_NAME, METRICS_NAME, FIGURES_DIR, BOARD_DIR})


def _check_run_folder(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise VqtoolError("exists and is not a folder; pick another --out", run_dir)
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES) if run_dir.is_dir() else []
    if others:
        raise VqtoolError(f"holds files that are not a run's ({', '.join(others[:3])}); pick another --out", run_dir)


def resume_run(
    run_dir: Path, *, epochs: int | None = None, steps: int | None = None, workers: int | None = None
) -> RunPlan:
    """The run in `run_dir`, to continue from its checkpoint with the plan it began with, unless `epochs`,
    `steps` or `workers` say otherwise."""
    try:
        saved = load_checkpoint(run_dir / CHECKPOINT_NAME)
    except CheckpointError as exc:
        raise VqtoolError(str(exc)) from None
    if not isinstance(saved.model_config, ModelConfig):
        raise VqtoolError("holds an imported model, which vqtool does not train", run_dir)
    changes: dict[str, int | None] = {
        k: v for k, v in (("epochs", epochs), ("steps", steps), ("workers", workers)) if v is not None
    }
    if "epochs" in changes and "steps" not in changes:
        changes["steps"] = None  # --epochs alone replaces a plan given in steps
    try:
        config = TrainConfig.from_dict({**saved.train_config.to_dict(), **changes})
    except ValueError as exc:
        raise VqtoolError(str(exc)) from None
    return RunPlan(saved.model_config, config, run_dir, Path(saved.data) if saved.data else None, resume=True)


def read_training_set(
    data: Path | None,
    image_size: int,
    config: TrainConfig,
    *,
    log: Callable[[str], None] = print,
) -> TrainingData:
    """The collection a run trains on, read as its configuration says (--max-pixels, --skip-bad, --val-data)."""
    for path in (data, config.val_data):
        if path is not None and not collection_exists(path):
            raise VqtoolError("no such file or folder", path)
    try:
        return load_training_set(
            data,
            image_size,
            max_pixels=config.max_pixels,
            skip_bad=config.skip_bad,
            val_data=config.val_data,
            log=log,
        )
    except RuntimeError as exc:  # the default data's missing scikit-image
        raise VqtoolError(str(exc)) from None


def train(plan: RunPlan, *, show_progress: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Train the planned run to its last step (or to an interrupt, saved first); returns where its files are. No
    other run may write the run's folder meanwhile."""
    # One run per folder: the process that writes it (rank 0 under torchrun) holds its lock while it trains.
    writes = os.environ.get("RANK", "0") == "0"
    with OutputLock(plan.run_dir) if writes else contextlib.nullcontext():
        return _train(plan, show_progress, log)


def _train(plan: RunPlan, show_progress: bool, log: Callable[[str], None]) -> RunResult:
    config = plan.train_config
    training_set = read_training_set(plan.data, plan.model_config.image_size, config, log=log)
    held_out = f"from {config.val_data}" if config.val_data else "held out"
    source = plan.data or "embedded default photographs"
    log(f"data: {source} — {len(training_set.val)} validation images {held_out}")
    try:
        result = fit(
            plan.model_config,
            config,
            training_set,
            plan.run_dir,
            data_source=str(plan.data) if plan.data else None,
            resume=plan.resume,
            show_progress=show_progress,
        )
    except (TrainingStopped, CheckpointError) as exc:
        raise VqtoolError(str(exc)) from None
    if result.is_main and result.skipped:
        log(f"{plan.data}: training {describe_skipped(result.skipped, getattr(training_set, 'epoch_size', None))}")
    return result
