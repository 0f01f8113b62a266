"""The article's study as `vqtool sweep` runs it: every combination of the listed options, each at several seeds, one
run folder each (finished runs are read back, not retrained). Statistics: sweep_stats.py; figures and the report:
sweep_report.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any

from vqtool.model.checkpoint import load_checkpoint
from vqtool.model.config import ModelConfig, TrainConfig
from vqtool.train.data.memory import TrainingData
from vqtool.train.loop import CHECKPOINT_NAME, fit
from vqtool.train.schedule import total_steps

# ModelConfig fields a sweep can take lists of, in the order they are named in run folders and tables.
SWEEP_AXES = ("codes", "dim", "downsample", "channels", "res_blocks", "lookup_dim", "l2_codes")
AXIS_TITLES = {
    "codes": "K",
    "dim": "D",
    "downsample": "factor",
    "channels": "channels",
    "res_blocks": "res blocks",
    "lookup_dim": "lookup dim",
    "l2_codes": "l2 codes",
}


@dataclass(frozen=True)
class SweepRun:
    model: ModelConfig
    seed: int
    records: list[dict[str, Any]]
    skipped: bool

    @property
    def codes(self) -> int:
        return self.model.codes

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def final(self) -> dict[str, Any]:
        return self.records[-1]


def sweep_variants(base: ModelConfig, axes: dict[str, Sequence[Any]]) -> list[ModelConfig]:
    """Every combination of the listed values (in SWEEP_AXES order), the other fields taken from `base`."""
    names = [name for name in SWEEP_AXES if name in axes]
    return [replace(base, **dict(zip(names, values, strict=True))) for values in product(*(axes[n] for n in names))]


def variant_name(model: ModelConfig) -> str:
    """K256_D256 for the reference design; each field that differs from it adds a suffix (_f8, _rb2, ...)."""
    reference = ModelConfig()
    parts = [f"K{model.codes}_D{model.dim}"]
    if model.image_size != reference.image_size:
        parts.append(f"s{model.image_size}")
    if model.downsample != reference.downsample:
        parts.append(f"f{model.downsample}")
    if model.channels != reference.channels:
        parts.append("c" + "-".join(map(str, model.channels)))
    if model.res_blocks:
        parts.append(f"rb{model.res_blocks}")
    if model.lookup_dim:
        parts.append(f"ld{model.lookup_dim}")
    if model.l2_codes:
        parts.append("l2")
    return "_".join(parts)


def run_dir_for(out: Path, model: ModelConfig, seed: int) -> Path:
    return out / variant_name(model) / f"seed{seed}"


def run_sweep(
    variants: Sequence[ModelConfig],
    seeds: int,
    base: TrainConfig,
    data: TrainingData,
    data_source: str | None,
    out: Path,
    log: Callable[[str], None] = print,
) -> list[SweepRun]:
    """Train each (variant, seed) in its own run directory; finished runs are read back, not retrained."""
    runs = []
    total_runs = len(variants) * seeds
    for index, (model, seed) in enumerate((m, s) for m in variants for s in range(seeds)):
        run_dir = run_dir_for(out, model, seed)
        config = replace(base, seed=seed)
        total = total_steps(config, data)
        checkpoint = run_dir / CHECKPOINT_NAME
        saved = load_checkpoint(checkpoint) if checkpoint.exists() else None
        label = f"[{index + 1}/{total_runs}] {variant_name(model)} seed={seed}"
        if saved is not None and saved.step >= total:
            log(f"{label}: finished earlier, skipped")
            runs.append(SweepRun(model, seed, list(saved.extra["records"]), skipped=True))
            continue
        log(f"{label}: training {total} steps")
        result = fit(
            model,
            config,
            data,
            run_dir,
            data_source=data_source,
            resume=saved is not None,
            show_progress=False,
            log_epochs=False,
        )
        records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
        runs.append(SweepRun(model, seed, records, skipped=False))
    return runs
