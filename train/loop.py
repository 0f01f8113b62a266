"""The training loop: seeded batches, epoch-end validation, atomic checkpoints, clean interrupts.

Under torchrun (WORLD_SIZE > 1) it trains data-parallel: each process takes a contiguous slice of
the same global batch, gradients and codebook statistics are summed across processes, and only
rank 0 validates and writes files. With equal slices this matches one process on the global batch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vqtool.errors import VqtoolError
from vqtool.formats.atomic import atomic_output
from vqtool.images.reading import SkippedFile
from vqtool.model.checkpoint import load_checkpoint, save_checkpoint
from vqtool.model.config import ModelConfig, TrainConfig
from vqtool.model.vqvae import VQVAE, images_to_input, output_to_images
from vqtool.train.board import Board
from vqtool.train.codebook import CodebookHealth, usage_divergence
from vqtool.train.data.memory import Batch, Share, TrainingData
from vqtool.train.figures import save_loss_curves, save_reconstruction_grid
from vqtool.train.metrics import evaluate
from vqtool.train.schedule import lr_factor, steps_per_epoch, total_steps

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
FIGURES_DIR = "figures"
# Early snapshots show the "structure first, colour later" progression the article describes.
SNAPSHOT_STEPS = (1, 10, 50, 100)
GRID_IMAGES = 16
TRACE_EVERY = 10
KMEANS_BATCHES = 8


class TrainingStopped(RuntimeError):
    """Training ended before its last step; the message says why and what was kept."""


@dataclass(frozen=True)
class RunResult:
    """Where a finished run left its files, and its last validation figures (rank 0 only)."""

    run_dir: Path
    checkpoint: Path
    metrics: Path
    figures: Path
    final: dict[str, Any]
    steps: int
    seconds: float
    interrupted: bool
    is_main: bool = True
    skipped: tuple[SkippedFile, ...] = ()  # training files left out under --skip-bad


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingStopped("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return torch.device(name)


def _start_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """One process (the usual case), or the process group torchrun describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return Distributed(), device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return Distributed(dist.get_rank(), dist.get_world_size()), device


def _weight_average(model: VQVAE, decay: float) -> AveragedModel | None:
    """PyTorch's exponential moving average of `model`'s weights, updated after each step (None when decay is 0).

    Codes re-seeded by --restart-dead join the average gradually, like every other weight.
    """
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


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
    with atomic_output(path) as temp:
        temp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


class _Run:
    """State of one run between steps; rank 0 owns the files in the run directory."""

    def __init__(
        self,
        model: VQVAE,
        config: TrainConfig,
        data: TrainingData,
        run_dir: Path,
        source: str | None,
        world: Distributed,
    ) -> None:
        self.model, self.config, self.data, self.run_dir, self.source = model, config, data, run_dir, source
        self.world = world
        self.device = next(model.parameters()).device
        self.health = CodebookHealth(model.quantizer, config)
        self.optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=config.lr, betas=(0.9, config.adam_beta2)
        )
        self.step = 0
        self.records: list[dict[str, Any]] = []
        self.trace: list[dict[str, float]] = []
        self.val = torch.from_numpy(data.val).to(self.device)
        self.batches: Iterator[Batch] | None = None
        self.board: Board | None = None  # rank 0's TensorBoard writer, opened once the run's step is known
        # Files left out under --skip-bad, by name, and where a tar-shard stream stands (for --resume).
        self.skipped: dict[str, SkippedFile] = {}
        self.stream_state: dict[str, Any] = {"epoch": 0, "started": []}
        self.sums = {"recon": 0.0, "codebook": 0.0, "commit": 0.0, "count": 0}
        self.started = time.perf_counter()
        self.trainer: torch.nn.Module = model
        self.averaged = _weight_average(model, config.average_weights)
        if config.batch_size % world.world:
            raise TrainingStopped(f"--batch-size {config.batch_size} must divide evenly over {world.world} processes")

    @property
    def evaluated(self) -> VQVAE:
        """The model validation, figures and the checkpoint see: the averaged weights where there are any."""
        # AveragedModel holds a copy of the VQVAE it was given, typed only as a Module.
        return self.model if self.averaged is None else cast(VQVAE, self.averaged.module)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.config, self.data)

    @property
    def total_steps(self) -> int:
        return total_steps(self.config, self.data)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def restore(self) -> None:
        saved = load_checkpoint(self.checkpoint_path, map_location=self.device)
        # With averaging, the file's model is the average and the weights being trained are kept beside it.
        self.model.load_state_dict(saved.extra.get("trained_weights", saved.model.state_dict()))
        if self.averaged is not None and "averaged_steps" in saved.extra:
            self.averaged.module.load_state_dict(saved.model.state_dict())
            self.averaged.n_averaged.fill_(int(saved.extra["averaged_steps"]))
        if saved.optimizer_state is not None:
            self.optimizer.load_state_dict(saved.optimizer_state)
        self.step = saved.step
        self.records = list(saved.extra.get("records", []))
        self.trace = list(saved.extra.get("trace", []))
        if "codebook" in saved.extra:
            self.health.load_state_dict(saved.extra["codebook"])
        self.stream_state = dict(saved.extra.get("stream", self.stream_state))
        self.skipped = {s["file"]: SkippedFile(s["file"], s["reason"]) for s in saved.extra.get("skipped", [])}

    def save(self) -> None:
        extra: dict[str, Any] = {
            "records": self.records,
            "trace": self.trace,
            "codebook": self.health.state_dict(),
            "stream": self.stream_state,
            "skipped": [s.to_dict() for s in self.skipped.values()],
        }
        if self.averaged is not None:
            extra["trained_weights"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            extra["averaged_steps"] = int(self.averaged.n_averaged)
        save_checkpoint(
            self.checkpoint_path,
            self.evaluated,
            self.config,
            step=self.step,
            epoch=self.epoch,
            data=self.source,
            optimizer=self.optimizer,
            extra=extra,
        )

    def next_images(self) -> np.ndarray:
        """This process's share of the current step's batch, from the data's readers (started at the first step)."""
        if self.batches is None:
            # workers None: the collection's default
            share = Share(self.world.rank, self.world.world, self.config.workers, self.stream_state)
            self.batches = self.data.stream(self.step, self.config.batch_size, self.config.seed, share)
        batch = next(self.batches)
        for skipped in batch.skipped:
            self.skipped.setdefault(skipped.file, skipped)
        for epoch, shard in batch.started:
            if epoch > self.stream_state["epoch"]:
                self.stream_state = {"epoch": epoch, "started": []}
            if epoch == self.stream_state["epoch"]:
                self.stream_state["started"].append(shard)
        return batch.images

    def read_step(self) -> np.ndarray:
        """next_images, agreed on by every process: a file that one process cannot read stops them all (the
        others would otherwise wait for it in the gradient reduction until torchrun's timeout)."""
        if not self.world.active:
            return self.next_images()
        failure: VqtoolError | None = None
        try:
            images = self.next_images()
        except VqtoolError as error:
            failure = error
        failed = torch.tensor([float(failure is not None)])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failure is not None:
            raise failure
        if failed[0] > 0:
            raise TrainingStopped("another process stopped on a training file it could not read (its error names it)")
        return images

    def close(self) -> None:
        """Stop the reader processes and close the TensorBoard writer."""
        self.batches = None
        if self.board is not None:
            self.board.close()

    @torch.no_grad()
    def kmeans_init(self) -> None:
        """Codebook from k-means on the encoder's outputs for the first batches (identical on every rank)."""
        latents = []
        for step in range(KMEANS_BATCHES):
            batch = self.data.batch(step, self.config.batch_size, self.config.seed)
            z = self.model.encode_latents(images_to_input(torch.from_numpy(batch).to(self.device)))
            latents.append(z.reshape(-1, z.shape[-1]))
        self.health.initialise(torch.cat(latents))

    def train_step(self, stop_requested: bool) -> tuple[dict[str, float], bool]:
        """One optimisation step; returns its losses and whether any process asked to stop."""
        x = images_to_input(torch.from_numpy(self.read_step()).to(self.device))
        temperature = self.config.usage_temperature if self.config.usage_loss else None
        result = self.trainer(x, rotation_trick=self.config.rotation_trick, usage_temperature=temperature)
        codebook_term = 0.0 if self.config.ema else result.codebook_loss
        loss = result.recon_loss + codebook_term + self.config.beta * result.commit_loss
        if result.assignment_sums is not None:
            loss = loss + self.config.usage_loss * self.usage_term(result.assignment_sums, result.codes.numel())
        losses = {
            "recon": result.recon_loss.item(),
            "codebook": result.codebook_loss.item(),
            "commit": result.commit_loss.item(),
        }
        flags = torch.tensor([float(stop_requested), float(not all(map(math.isfinite, losses.values())))])
        if self.world.active:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1] > 0:
            kept = (
                f"the last good checkpoint (step {self.step}) is kept"
                if self.checkpoint_path.exists()
                else "no checkpoint had been written yet"
            )
            details = "/".join(f"{k}={v}" for k, v in losses.items())
            raise TrainingStopped(
                f"loss became {details} at step {self.step + 1}; {kept} in {self.run_dir}; try a lower --lr"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        factor = lr_factor(
            self.config.lr_schedule,
            self.step,
            self.total_steps,
            self.config.warmup_steps,
            self.config.cooldown_steps,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor
        self.optimizer.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        self.health.after_step(result.latents, result.codes, self.step)
        self.step += 1
        for key, value in losses.items():
            self.sums[key] += value
        self.sums["count"] += 1
        if self.step % TRACE_EVERY == 0:
            self.trace.append({"step": float(self.step), **losses})
        return losses, bool(flags[0] > 0)

    def usage_term(self, assignment_sums: torch.Tensor, local_count: int) -> torch.Tensor:
        """usage_divergence of the global batch: under torchrun the sums are all-reduced with a reduction that
        carries gradients, so with DDP's averaging every process gets the gradient one process would."""
        if not self.world.active:
            return usage_divergence(assignment_sums, local_count)
        from torch.distributed.nn.functional import all_reduce

        return usage_divergence(all_reduce(assignment_sums), local_count * self.world.world)

    def end_epoch(self) -> dict[str, Any]:
        """Validate, log, checkpoint and draw; called at each epoch's end and at the run's end (rank 0)."""
        count = max(1, int(self.sums["count"]))
        validation, codes = evaluate(self.evaluated, self.val)
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "train_mse": self.sums["recon"] / count,
            "codebook_loss": self.sums["codebook"] / count,
            "commit_loss": self.sums["commit"] / count,
            **validation,
            "restarts": self.health.restarts,
            "skipped_files": len(self.skipped),
            "elapsed_s": round(time.perf_counter() - self.started, 2),
        }
        self.sums = {"recon": 0.0, "codebook": 0.0, "commit": 0.0, "count": 0}
        if self.board is not None and self.board.active:
            self.board.record(record, codes, self.model.config.codes)
        self.records = [r for r in self.records if r["step"] < self.step] + [record]
        _write_jsonl(self.run_dir / METRICS_NAME, self.records)
        self.save()
        self.snapshot()
        save_loss_curves(self.run_dir / FIGURES_DIR / "loss.png", self.trace, self.records)
        return record

    @torch.no_grad()
    def snapshot(self) -> None:
        model = self.evaluated
        was_training = model.training
        model.eval()
        inputs = self.val[:GRID_IMAGES]
        reconstruction = output_to_images(model(images_to_input(inputs)).reconstruction)
        model.train(was_training)
        path = self.run_dir / FIGURES_DIR / f"recon_step{self.step:07d}.png"
        grid = save_reconstruction_grid(path, inputs.cpu().numpy(), reconstruction.cpu().numpy())
        if self.board is not None:
            self.board.image("reconstructions (inputs above)", grid, self.step)


def _progress_bar(show: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=Console(stderr=True, soft_wrap=True), disable=not show, transient=False)


def _start_run(
    model_config: ModelConfig,
    config: TrainConfig,
    data: TrainingData,
    run_dir: Path,
    data_source: str | None,
    resume: bool,
) -> _Run:
    """The model on its device, restored or initialised, with its board and, under torchrun, its DDP wrapper."""
    world, device = _start_distributed(config.device)
    torch.manual_seed(config.seed)
    model = VQVAE(model_config).to(device).train()
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(model, config, data, run_dir, data_source, world)
    if resume:
        run.restore()
    if not run.health.initialised:
        run.kmeans_init()
    if world.main:
        run.board = Board(run_dir, run.step)
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        run.trainer = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return run


def _train_until_done(run: _Run, bar: Any, log_epochs: bool) -> bool:
    """Step until the last step or an interrupt (then True), validating and saving at each epoch's end."""
    total, main = run.total_steps, run.world.main
    smooth: dict[str, float] = {}
    with _deferred_interrupt() as stop, bar:
        task = bar.add_task("train", total=total, completed=run.step, losses="")
        while run.step < total:
            losses, stopping = run.train_step(stop["stop"])
            smooth = {k: v if k not in smooth else 0.9 * smooth[k] + 0.1 * v for k, v in losses.items()}
            bar.update(task, advance=1, losses="  ".join(f"{k} {v:.4f}" for k, v in smooth.items()))
            if main and run.step in SNAPSHOT_STEPS:
                run.snapshot()
            if main and run.step % run.steps_per_epoch == 0 and run.step < total:
                record = run.end_epoch()
                if log_epochs:
                    # print, not log: log lays out a fixed-width time column and wraps on pipes.
                    bar.console.print(
                        f"epoch {run.epoch} (step {run.step}, {record['elapsed_s']:.0f} s): "
                        f"val_mse {record['val_mse']:.4f}  val_psnr {record['val_psnr']:.2f} dB"
                        f"  usage {record['usage']:.1%}  perplexity {record['perplexity']:.1f}",
                        highlight=False,
                    )
            if stopping:
                return True
    return False


def fit(
    model_config: ModelConfig,
    config: TrainConfig,
    data: TrainingData,
    run_dir: Path,
    *,
    data_source: str | None,
    resume: bool = False,
    show_progress: bool = True,
    log_epochs: bool = True,
) -> RunResult:
    """Train (or continue training) a VQ-VAE in `run_dir`; returns where its outputs are."""
    run = _start_run(model_config, config, data, run_dir, data_source, resume)
    world = run.world
    try:
        interrupted = _train_until_done(run, _progress_bar(show_progress and world.main), log_epochs)
        final: dict[str, Any] = {}
        if world.main:
            done = run.records and run.records[-1]["step"] == run.step
            final = run.records[-1] if done else run.end_epoch()
        if world.active:
            dist.barrier()  # rank 0 may still be writing; leaving the group early aborts the others
    finally:
        run.close()
        if world.active and dist.is_initialized():
            dist.destroy_process_group()
    return RunResult(
        run_dir=run_dir,
        checkpoint=run.checkpoint_path,
        metrics=run_dir / METRICS_NAME,
        figures=run_dir / FIGURES_DIR,
        final=final,
        steps=run.step,
        seconds=time.perf_counter() - run.started,
        interrupted=interrupted,
        is_main=world.main,
        skipped=tuple(run.skipped.values()),
    )
