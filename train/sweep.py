"""The article's study: every (K, D) pair with repeated seeds, summarised with 95% confidence intervals."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.atomic import atomic_output
from vqtool.train.checkpoint import load_checkpoint
from vqtool.train.config import ModelConfig, TrainConfig
from vqtool.train.data import TrainingSet
from vqtool.train.loop import CHECKPOINT_NAME, fit

# Two-sided 97.5% quantiles of Student's t for n - 1 degrees of freedom (n seeds); normal beyond.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
SUMMARY_KEYS = ("val_mse", "val_psnr", "usage", "perplexity")


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (0 for a single value)."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return float(data.mean()), 0.0
    return float(data.mean()), T_975.get(len(data) - 1, 1.96) * float(data.std(ddof=1)) / math.sqrt(len(data))


@dataclass(frozen=True)
class SweepRun:
    codes: int
    dim: int
    seed: int
    records: list[dict[str, Any]]
    skipped: bool

    @property
    def final(self) -> dict[str, Any]:
        return self.records[-1]


def run_dir_for(out: Path, codes: int, dim: int, seed: int) -> Path:
    return out / f"K{codes}_D{dim}" / f"seed{seed}"


def run_sweep(
    codes: Sequence[int],
    dims: Sequence[int],
    seeds: int,
    base: TrainConfig,
    model: ModelConfig,
    data: TrainingSet,
    data_source: str | None,
    out: Path,
    log: Callable[[str], None] = print,
) -> list[SweepRun]:
    """Train each (K, D, seed) in its own run directory; finished runs are read back, not retrained."""
    runs = []
    total_runs = len(codes) * len(dims) * seeds
    for index, (k, d, seed) in enumerate((k, d, s) for k in codes for d in dims for s in range(seeds)):
        run_dir = run_dir_for(out, k, d, seed)
        config = replace(base, seed=seed)
        steps_per_epoch = config.steps_per_epoch or data.steps_per_epoch(config.batch_size)
        total = config.steps if config.steps is not None else config.epochs * steps_per_epoch
        checkpoint = run_dir / CHECKPOINT_NAME
        saved = load_checkpoint(checkpoint) if checkpoint.exists() else None
        if saved is not None and saved.step >= total:
            log(f"[{index + 1}/{total_runs}] K={k} D={d} seed={seed}: finished earlier, skipped")
            runs.append(SweepRun(k, d, seed, list(saved.extra["records"]), skipped=True))
            continue
        log(f"[{index + 1}/{total_runs}] K={k} D={d} seed={seed}: training {total} steps")
        result = fit(
            replace(model, codes=k, dim=d),
            config,
            data,
            run_dir,
            data_source=data_source,
            resume=saved is not None,
            show_progress=False,
            log_epochs=False,
        )
        records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
        runs.append(SweepRun(k, d, seed, records, skipped=False))
    return runs


def summarise(runs: Sequence[SweepRun], beta: float) -> list[dict[str, Any]]:
    """Per (K, D): final validation figures as mean ± 95% CI over seeds, and per-epoch curves."""
    rows = []
    for k, d in sorted({(r.codes, r.dim) for r in runs}):
        group = [r for r in runs if (r.codes, r.dim) == (k, d)]
        row: dict[str, Any] = {"codes": k, "dim": d, "seeds": len(group)}
        for key in SUMMARY_KEYS:
            row[key], row[f"{key}_ci95"] = mean_ci([r.final[key] for r in group])
        epochs = min(len(r.records) for r in group)
        for name, pick in (
            ("recon", lambda e: e["train_mse"]),
            ("vq", lambda e: e["codebook_loss"] + beta * e["commit_loss"]),
        ):
            curves = np.array([[pick(e) for e in r.records[:epochs]] for r in group])
            stats = [mean_ci(curves[:, i]) for i in range(epochs)]
            row[f"{name}_curve"] = [m for m, _ in stats]
            row[f"{name}_curve_ci95"] = [c for _, c in stats]
        rows.append(row)
    return rows


def _plot_band(axis: Any, mean: Sequence[float], ci: Sequence[float], label: str) -> None:
    x = np.arange(1, len(mean) + 1)
    axis.plot(x, mean, label=label, lw=1.5)
    # Losses are drawn on a log axis: a band reaching zero or below would swamp the others.
    lower = np.maximum(np.subtract(mean, ci), np.asarray(mean) * 0.05)
    axis.fill_between(x, lower, np.add(mean, ci), alpha=0.25)


def draw_figures(rows: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """One curve figure per K, a grid of all pairs, and a heatmap of final validation MSE (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    codes, dims = sorted({r["codes"] for r in rows}), sorted({r["dim"] for r in rows})
    made = []
    for k in codes:
        figure, (recon, vq) = plt.subplots(1, 2, figsize=(10, 3.6))
        for row in (r for r in rows if r["codes"] == k):
            _plot_band(recon, row["recon_curve"], row["recon_curve_ci95"], f"D={row['dim']}")
            _plot_band(vq, row["vq_curve"], row["vq_curve_ci95"], f"D={row['dim']}")
        for axis, title in ((recon, f"reconstruction loss, K={k}"), (vq, f"VQ loss, K={k}")):
            axis.set(title=title, xlabel="epoch", yscale="log")
            axis.legend(fontsize=8)
        figure.tight_layout()
        made.append(folder / f"curves_K{k}.png")
        figure.savefig(made[-1], dpi=110)
        plt.close(figure)
    figure, axes = plt.subplots(
        len(codes), len(dims), figsize=(2.6 * len(dims), 2.0 * len(codes)), sharex=True, sharey=True, squeeze=False
    )
    for row in rows:
        axis = axes[codes.index(row["codes"])][dims.index(row["dim"])]
        _plot_band(axis, row["recon_curve"], row["recon_curve_ci95"], "")
        axis.set_title(f"K={row['codes']} D={row['dim']}", fontsize=8)
        axis.set_yscale("log")
    figure.suptitle("reconstruction loss per epoch (mean, 95% CI over seeds)")
    figure.tight_layout()
    made.append(folder / "curves_grid.png")
    figure.savefig(made[-1], dpi=100)
    plt.close(figure)
    grid = np.full((len(codes), len(dims)), np.nan)
    for row in rows:
        grid[codes.index(row["codes"]), dims.index(row["dim"])] = row["val_mse"]
    figure, axis = plt.subplots(figsize=(1.4 * len(dims) + 2, 1.1 * len(codes) + 1.5))
    image = axis.imshow(grid, cmap="viridis_r")
    axis.set(
        xticks=range(len(dims)),
        xticklabels=dims,
        yticks=range(len(codes)),
        yticklabels=codes,
        xlabel="latent size D",
        ylabel="codes K",
        title="final validation MSE",
    )
    for i in range(len(codes)):
        for j in range(len(dims)):
            axis.text(j, i, f"{grid[i, j]:.4f}", ha="center", va="center", fontsize=8, color="w")
    figure.colorbar(image)
    figure.tight_layout()
    made.append(folder / "heatmap_val_mse.png")
    figure.savefig(made[-1], dpi=110)
    plt.close(figure)
    return made


def summary_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The summary as markdown table lines: mean ± 95% CI per (K, D)."""
    lines = [
        "| K | D | seeds | val MSE | val PSNR (dB) | codebook usage | perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['codes']} | {r['dim']} | {r['seeds']} | {r['val_mse']:.4f} ± {r['val_mse_ci95']:.4f} | "
            f"{r['val_psnr']:.2f} ± {r['val_psnr_ci95']:.2f} | {r['usage']:.1%} ± {r['usage_ci95']:.1%} | "
            f"{r['perplexity']:.1f} ± {r['perplexity_ci95']:.1f} |"
        )
    return lines


def report_markdown(
    rows: Sequence[dict[str, Any]], figures: Sequence[Path], relative_to: Path, command: str, seconds: float
) -> str:
    """The sweep's summary as markdown: table, findings drawn from the numbers, figures."""
    best = min(rows, key=lambda r: r["val_mse"])
    by_k = {}
    for k in sorted({r["codes"] for r in rows}):
        group = [r for r in rows if r["codes"] == k]
        by_k[k] = (np.mean([r["usage"] for r in group]), np.mean([r["usage"] * k for r in group]))
    reference = next((r for r in rows if (r["codes"], r["dim"]) == (256, 256)), None)
    lines = [
        "# Results: the article's K x D sweep",
        "",
        f"Made by `{command}`; the runs trained for {seconds / 60:.0f} min in all on a 2-core CPU. "
        "Final validation figures are "
        "mean ± 95% CI over seeds (Student's t); curves are per epoch with 95% bands.",
        "",
        *summary_table(rows),
        "",
        "Findings (computed from the table):",
        "",
        f"- Lowest validation MSE: K={best['codes']}, D={best['dim']} "
        f"({best['val_mse']:.4f} ± {best['val_mse_ci95']:.4f}, {best['val_psnr']:.2f} dB).",
    ]
    usage = ", ".join(f"K={k}: {u:.1%} ({n:.0f} codes)" for k, (u, n) in by_k.items())
    lines.append(f"- Codebook usage by K (mean over D and seeds): {usage}.")
    if reference is not None:
        overlap = reference["val_mse"] - reference["val_mse_ci95"] <= best["val_mse"] + best["val_mse_ci95"]
        verdict = "within the confidence interval of the best" if overlap else "worse than the best beyond the CIs"
        lines.append(
            f"- The article's best pair (K=256, D=256): {reference['val_mse']:.4f} ± "
            f"{reference['val_mse_ci95']:.4f}, {verdict}."
        )
    lines += ["", *[f"![{p.stem}]({p.relative_to(relative_to).as_posix()})" for p in figures], ""]
    return "\n".join(lines)


def publish_report(text: str, figures: Sequence[Path], report: Path) -> None:
    """Copy the report and its figures next to each other (e.g. docs/results.md + docs/figures/)."""
    target = report.parent / "figures"
    target.mkdir(parents=True, exist_ok=True)
    for figure in figures:
        shutil.copy2(figure, target / figure.name)
    with atomic_output(report) as temp:
        temp.write_text(text)
