"""A sweep's runs summarised: per variant, the mean of each final figure over seeds with its 95% confidence interval
(Student's t), and the curves' means and bands."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vqtool.model.config import ModelConfig
from vqtool.train.sweep import AXIS_TITLES, SWEEP_AXES, SweepRun, variant_name

# Two-sided 97.5% quantiles of Student's t for n - 1 degrees of freedom (n seeds); normal beyond.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
SUMMARY_KEYS = ("val_mse", "val_psnr", "usage", "perplexity")


def mean_ci(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (0 for a single value)."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return float(data.mean()), 0.0
    return float(data.mean()), T_975.get(len(data) - 1, 1.96) * float(data.std(ddof=1)) / math.sqrt(len(data))


def _curve_stats(group: Sequence[SweepRun], pick: Callable[[dict[str, Any]], float]) -> tuple[list[float], list[float]]:
    epochs = min(len(r.records) for r in group)
    curves = np.array([[pick(e) for e in r.records[:epochs]] for r in group])
    stats = [mean_ci(curves[:, i]) for i in range(epochs)]
    return [m for m, _ in stats], [c for _, c in stats]


def _axis_order(model: ModelConfig) -> list[tuple[bool, Any]]:
    """Variants in numeric order along each axis (K = 64 before 512), a missing lookup projection first."""
    values = (getattr(model, axis) for axis in SWEEP_AXES)
    return [(value is not None, value if value is not None else 0) for value in values]


def summarise(runs: Sequence[SweepRun], beta: float) -> list[dict[str, Any]]:
    """Per variant: final validation figures and training time as mean ± 95% CI over seeds, per-epoch curves."""
    rows = []
    for model in sorted({r.model for r in runs}, key=_axis_order):
        group = [r for r in runs if r.model == model]
        row: dict[str, Any] = {"variant": variant_name(model), **model.to_dict(), "seeds": len(group)}
        for key in SUMMARY_KEYS:
            row[key], row[f"{key}_ci95"] = mean_ci([r.final[key] for r in group])
        row["train_s"], row["train_s_ci95"] = mean_ci([float(r.final.get("elapsed_s", 0.0)) for r in group])
        row["curve_steps"] = [int(e["step"]) for e in group[0].records[: min(len(r.records) for r in group)]]
        curves = {
            "recon": lambda e: e["train_mse"],
            "vq": lambda e: e["codebook_loss"] + beta * e["commit_loss"],
            "val_psnr": lambda e: e["val_psnr"],
            "usage": lambda e: e["usage"],
        }
        for name, pick in curves.items():
            row[f"{name}_curve"], row[f"{name}_curve_ci95"] = _curve_stats(group, pick)
        rows.append(row)
    return rows


def varying_axes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """K and D always (the article's sweep), then every other axis that takes more than one value."""
    return [a for a in SWEEP_AXES if a in ("codes", "dim") or len({str(r[a]) for r in rows}) > 1]


def axis_value(row: dict[str, Any], axis: str) -> str:
    value = row[axis]
    if axis == "channels":
        return ",".join(map(str, value))
    if axis == "l2_codes":
        return "yes" if value else "no"
    return "-" if value is None else str(value)


def variant_label(row: dict[str, Any], axes: Sequence[str]) -> str:
    return " ".join(f"{AXIS_TITLES[a]}={axis_value(row, a)}" for a in axes)
