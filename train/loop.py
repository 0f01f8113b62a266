"""The training loop: seeded batches, epoch-end validation, atomic checkpoints, clean interrupts."""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.atomic import atomic_path
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import ModelConfig, TrainConfig
from train.data import TrainingSet
from train.figures import save_loss_curves, save_reconstruction_grid
from train.metrics import evaluate
from train.model import VQVAE, images_to_input, output_to_images

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
FIGURES_DIR = "figures"
# Early snapshots show the "structure first, colour later" progression the article describes.
SNAPSHOT_STEPS = (1, 10, 50, 100)
GRID_IMAGES = 16
TRACE_EVERY = 10


class TrainingStopped(RuntimeError):
    """Training ended before its last step; the message says why and what was kept."""


@dataclass(frozen=True)
class RunResult:
    """Where a finished run left its files, and its last validation figures."""

    run_dir: Path
    checkpoint: Path
    metrics: Path
    figures: Path
    final: dict[str, Any]
    steps: int
    seconds: float
    interrupted: bool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingStopped("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return torch.device(name)


@contextmanager
def _deferred_interrupt() -> Iterator[dict[str, bool]]:
    """Turn Ctrl-C into a flag checked between steps, so a checkpoint is never saved mid-update."""
    flag = {"stop": False}

    def request_stop(signum: int, frame: Any) -> None:
        if flag["stop"]:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, request_stop)
    except ValueError:  # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with atomic_path(path) as temp:
        temp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


class _Run:
    """State of one run between steps; owns the files in the run directory."""

    def __init__(self, model: VQVAE, config: TrainConfig, data: TrainingSet, run_dir: Path, source: str | None):
        self.model, self.config, self.data, self.run_dir, self.source = model, config, data, run_dir, source
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        self.step = 0
        self.records: list[dict[str, Any]] = []
        self.trace: list[dict[str, float]] = []
        self.val = torch.from_numpy(data.val).to(self.device)
        self.sums = {"recon": 0.0, "codebook": 0.0, "commit": 0.0, "count": 0}
        self.started = time.perf_counter()

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def restore(self) -> None:
        saved = load_checkpoint(self.checkpoint_path, map_location=self.device)
        self.model.load_state_dict(saved.model.state_dict())
        if saved.optimizer_state is not None:
            self.optimizer.load_state_dict(saved.optimizer_state)
        self.step = saved.step
        self.records = list(saved.extra.get("records", []))
        self.trace = list(saved.extra.get("trace", []))

    def save(self) -> None:
        save_checkpoint(
            self.checkpoint_path,
            self.model,
            self.config,
            step=self.step,
            epoch=self.epoch,
            data=self.source,
            optimizer=self.optimizer,
            extra={"records": self.records, "trace": self.trace},
        )

    @property
    def epoch(self) -> int:
        return self.step // self.data.steps_per_epoch(self.config.batch_size)

    def train_step(self) -> dict[str, float]:
        batch = self.data.batch(self.step, self.config.batch_size, self.config.seed)
        x = images_to_input(torch.from_numpy(batch).to(self.device))
        result = self.model(x)
        loss = result.recon_loss + result.codebook_loss + self.config.beta * result.commit_loss
        losses = {
            "recon": result.recon_loss.item(),
            "codebook": result.codebook_loss.item(),
            "commit": result.commit_loss.item(),
        }
        if not all(math.isfinite(v) for v in losses.values()):
            kept = (
                f"the last good checkpoint (step {self.step}) is kept"
                if self.checkpoint_path.exists()
                else ("no checkpoint had been written yet")
            )
            raise TrainingStopped(
                f"loss became {'/'.join(f'{k}={v}' for k, v in losses.items())} at step {self.step + 1}; "
                f"{kept} in {self.run_dir}; try a lower --lr"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        for key, value in losses.items():
            self.sums[key] += value
        self.sums["count"] += 1
        if self.step % TRACE_EVERY == 0:
            self.trace.append({"step": float(self.step), **losses})
        return losses

    def end_epoch(self) -> dict[str, Any]:
        """Validate, log, checkpoint and draw; called at each epoch's end and at the run's end."""
        count = max(1, int(self.sums["count"]))
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": self.step / self.data.steps_per_epoch(self.config.batch_size),
            "train_mse": self.sums["recon"] / count,
            "codebook_loss": self.sums["codebook"] / count,
            "commit_loss": self.sums["commit"] / count,
            **evaluate(self.model, self.val),
            "elapsed_s": round(time.perf_counter() - self.started, 2),
        }
        self.sums = {"recon": 0.0, "codebook": 0.0, "commit": 0.0, "count": 0}
        self.records = [r for r in self.records if r["step"] < self.step] + [record]
        _write_jsonl(self.run_dir / METRICS_NAME, self.records)
        self.save()
        self.snapshot()
        save_loss_curves(self.run_dir / FIGURES_DIR / "loss.png", self.trace, self.records)
        return record

    @torch.no_grad()
    def snapshot(self) -> None:
        was_training = self.model.training
        self.model.eval()
        inputs = self.val[:GRID_IMAGES]
        reconstruction = output_to_images(self.model(images_to_input(inputs)).reconstruction)
        self.model.train(was_training)
        path = self.run_dir / FIGURES_DIR / f"recon_step{self.step:07d}.png"
        save_reconstruction_grid(path, inputs.cpu().numpy(), reconstruction.cpu().numpy())


def fit(
    model_config: ModelConfig,
    config: TrainConfig,
    data: TrainingSet,
    run_dir: Path,
    *,
    data_source: str | None,
    resume: bool = False,
    show_progress: bool = True,
) -> RunResult:
    """Train (or continue training) a VQ-VAE in `run_dir`; returns where its outputs are."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = VQVAE(model_config).to(device).train()
    run_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(model, config, data, run_dir, data_source)
    if resume:
        run.restore()
    steps_per_epoch = data.steps_per_epoch(config.batch_size)
    total = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    columns = (
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TimeRemainingColumn(),
    )
    interrupted = False
    smooth: dict[str, float] = {}
    with _deferred_interrupt() as stop, Progress(*columns, disable=not show_progress, transient=False) as bar:
        task = bar.add_task("train", total=total, completed=run.step, losses="")
        while run.step < total:
            losses = run.train_step()
            smooth = {k: v if k not in smooth else 0.9 * smooth[k] + 0.1 * v for k, v in losses.items()}
            bar.update(task, advance=1, losses="  ".join(f"{k} {v:.4f}" for k, v in smooth.items()))
            if run.step in SNAPSHOT_STEPS:
                run.snapshot()
            if run.step % steps_per_epoch == 0 and run.step < total:
                record = run.end_epoch()
                bar.console.log(
                    f"epoch {run.epoch}: val_mse {record['val_mse']:.4f}  val_psnr {record['val_psnr']:.2f} dB"
                    f"  usage {record['usage']:.1%}  perplexity {record['perplexity']:.1f}"
                )
            if stop["stop"]:
                interrupted = True
                break
    final = run.end_epoch() if (run.records == [] or run.records[-1]["step"] != run.step) else run.records[-1]
    return RunResult(
        run_dir=run_dir,
        checkpoint=run.checkpoint_path,
        metrics=run_dir / METRICS_NAME,
        figures=run_dir / FIGURES_DIR,
        final=final,
        steps=run.step,
        seconds=time.perf_counter() - run.started,
        interrupted=interrupted,
    )
