"""The article's study: every (K, D) pair with repeated seeds, summarised with 95% confidence intervals."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.formats.atomic import atomic_output
from vqtool.model.checkpoint import load_checkpoint
from vqtool.model.config import ModelConfig, TrainConfig
from vqtool.train.data.memory import TrainingData
from vqtool.train.loop import CHECKPOINT_NAME, fit
from vqtool.train.schedule import total_steps

# Two-sided 97.5% quantiles of Student's t for n - 1 degrees of freedom (n seeds); normal beyond.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
SUMMARY_KEYS = ("val_mse", "val_psnr", "usage", "perplexity")


def mean_ci(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (0 for a single value)."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return float(data.mean()), 0.0
    return float(data.mean()), T_975.get(len(data) - 1, 1.96) * float(data.std(ddof=1)) / math.sqrt(len(data))


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


def _axis_value(row: dict[str, Any], axis: str) -> str:
    value = row[axis]
    if axis == "channels":
        return ",".join(map(str, value))
    if axis == "l2_codes":
        return "yes" if value else "no"
    return "-" if value is None else str(value)


def _variant_label(row: dict[str, Any], axes: Sequence[str]) -> str:
    return " ".join(f"{AXIS_TITLES[a]}={_axis_value(row, a)}" for a in axes)


def _plot_band(axis: Any, mean: Sequence[float], ci: Sequence[float], label: str) -> None:
    x = np.arange(1, len(mean) + 1)
    axis.plot(x, mean, label=label, lw=1.5)
    # Losses are drawn on a log axis: a band reaching zero or below would swamp the others.
    lower = np.maximum(np.subtract(mean, ci), np.asarray(mean) * 0.05)
    axis.fill_between(x, lower, np.add(mean, ci), alpha=0.25)


def draw_figures(rows: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """PNG figures: for a K x D sweep one curve figure per K, a grid of all pairs and a heatmap of final
    validation MSE; for a sweep over other axes, the loss curves of every variant and its final PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    axes_varied = varying_axes(rows)
    if axes_varied != ["codes", "dim"]:
        return _draw_variant_figures(plt, rows, axes_varied, folder)
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


def _draw_variant_figures(plt: Any, rows: Sequence[dict[str, Any]], axes_varied: list[str], folder: Path) -> list[Path]:
    # K and D are named only where they vary: a capacity study at one (K, D) labels its lines by what changes.
    shown = [a for a in axes_varied if len({str(r[a]) for r in rows}) > 1] or axes_varied
    figure, (recon, psnr) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        label = _variant_label(row, shown)
        _plot_band(recon, row["recon_curve"], row["recon_curve_ci95"], label)
        _plot_band(psnr, row["val_psnr_curve"], row["val_psnr_curve_ci95"], label)
    recon.set(title="training reconstruction loss", xlabel="epoch", yscale="log")
    psnr.set(title="validation PSNR (dB)", xlabel="epoch")
    psnr.legend(fontsize=7)
    figure.tight_layout()
    curves = folder / "curves.png"
    figure.savefig(curves, dpi=110)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 3.8))
    labels = [_variant_label(r, shown).replace(" ", "\n") for r in rows]
    axis.bar(range(len(rows)), [r["val_psnr"] for r in rows], yerr=[r["val_psnr_ci95"] for r in rows], capsize=4)
    low = min(r["val_psnr"] - r["val_psnr_ci95"] for r in rows)
    axis.set(xticks=range(len(rows)), ylabel="final validation PSNR (dB)", ylim=(max(0.0, low - 1.0), None))
    axis.set_xticklabels(labels, fontsize=7)
    figure.tight_layout()
    final = folder / "final_psnr.png"
    figure.savefig(final, dpi=110)
    plt.close(figure)
    return [curves, final]


def summary_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The summary as markdown table lines: mean ± 95% CI per variant, named by the axes that vary."""
    axes = varying_axes(rows)
    head = [AXIS_TITLES[a] for a in axes] + ["seeds", "val MSE", "val PSNR (dB)", "codebook usage", "perplexity"]
    lines = ["| " + " | ".join([*head, "training (s)"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        cells = [_axis_value(r, a) for a in axes] + [
            str(r["seeds"]),
            f"{r['val_mse']:.4f} ± {r['val_mse_ci95']:.4f}",
            f"{r['val_psnr']:.2f} ± {r['val_psnr_ci95']:.2f}",
            f"{r['usage']:.1%} ± {r['usage_ci95']:.1%}",
            f"{r['perplexity']:.1f} ± {r['perplexity_ci95']:.1f}",
            f"{r['train_s']:.0f} ± {r['train_s_ci95']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# A run with this few validation records gets a table of them: the figures at 1x, 2x, 4x the steps, say.
STEP_TABLE_MAX_RECORDS = 8


def steps_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Validation PSNR and usage at each recorded step (mean ± 95% CI), when runs record few steps."""
    if not rows or max(len(r["curve_steps"]) for r in rows) > STEP_TABLE_MAX_RECORDS:
        return []
    axes = varying_axes(rows)
    lines = [
        "| " + " | ".join([AXIS_TITLES[a] for a in axes] + ["step", "val PSNR (dB)", "codebook usage"]) + " |",
        "|" + "---|" * (len(axes) + 3),
    ]
    for r in rows:
        for i, step in enumerate(r["curve_steps"]):
            psnr = f"{r['val_psnr_curve'][i]:.2f} ± {r['val_psnr_curve_ci95'][i]:.2f}"
            usage = f"{r['usage_curve'][i]:.1%} ± {r['usage_curve_ci95'][i]:.1%}"
            lines.append("| " + " | ".join([*(_axis_value(r, a) for a in axes), str(step), psnr, usage]) + " |")
    return lines


def report_markdown(
    rows: Sequence[dict[str, Any]],
    figures: Sequence[Path],
    command: str,
    seconds: float,
    figure_dir: str = "figures/",
    title: str | None = None,
) -> str:
    """The sweep's summary as markdown: table, findings drawn from the numbers, and figure links into
    `figure_dir` (relative to the markdown file)."""
    axes = varying_axes(rows)
    best = min(rows, key=lambda r: r["val_mse"])
    title = title or (
        "the article's K x D sweep"
        if axes == ["codes", "dim"]
        else "sweep over " + ", ".join(AXIS_TITLES[a] for a in axes)
    )
    lines = [
        f"## Results: {title}",
        "",
        f"Made by `{command}`; the runs trained for {seconds / 60:.0f} min in all on {_machine()}. "
        "Final validation figures and training times are "
        "mean ± 95% CI over seeds (Student's t); curves are per epoch with 95% bands.",
        "",
        *summary_table(rows),
        "",
        "Findings (computed from the table):",
        "",
        f"- Lowest validation MSE: {_variant_label(best, axes)} "
        f"({best['val_mse']:.4f} ± {best['val_mse_ci95']:.4f}, {best['val_psnr']:.2f} dB).",
    ]
    overlapping = [
        r for r in rows if r is not best and r["val_mse"] - r["val_mse_ci95"] <= best["val_mse"] + best["val_mse_ci95"]
    ]
    if overlapping:
        tied = "; ".join(_variant_label(r, axes) for r in overlapping)
        lines.append(f"- Within the confidence interval of the best: {tied}.")
    by_k = {}
    for k in sorted({r["codes"] for r in rows}):
        group = [r for r in rows if r["codes"] == k]
        by_k[k] = (np.mean([r["usage"] for r in group]), np.mean([r["usage"] * k for r in group]))
    usage = ", ".join(f"K={k}: {u:.1%} ({n:.0f} codes)" for k, (u, n) in by_k.items())
    lines.append(f"- Codebook usage by K (mean over the other axes and seeds): {usage}.")
    reference = next((r for r in rows if r["variant"] == "K256_D256"), None)
    if reference is not None and reference is not best:
        overlap = reference["val_mse"] - reference["val_mse_ci95"] <= best["val_mse"] + best["val_mse_ci95"]
        verdict = "within the confidence interval of the best" if overlap else "worse than the best beyond the CIs"
        lines.append(
            f"- The article's model (K=256, D=256): {reference['val_mse']:.4f} ± "
            f"{reference['val_mse_ci95']:.4f}, {verdict}."
        )
    by_step = steps_table(rows)
    if by_step:
        lines += ["", "At each recorded step:", "", *by_step]
    links = [f"![{p.stem}]({figure_dir}{p.name})" for p in figures]
    lines += ["", *links, ""]
    return "\n".join(lines)


def _machine() -> str:
    """The machine the runs trained on, as a report names it: the CPU and its cores."""
    import os

    from vqtool.host import cpu_description

    return f"{cpu_description()} with {os.cpu_count()} cores"


def _section_markers(key: str) -> tuple[str, str]:
    return f"<!-- vqtool sweep {key}: begin -->", f"<!-- vqtool sweep {key}: end -->"


def publish_report(text: str, figures: Sequence[Path], report: Path, key: str) -> None:
    """Put the sweep's section into `report` (replacing its earlier section, or added after the others) and its
    figures into figures/KEY/ beside it, so that several sweeps (K x D, capacity, ...) share one results page."""
    target = report.parent / "figures" / key
    target.mkdir(parents=True, exist_ok=True)
    for figure in figures:
        shutil.copy2(figure, target / figure.name)
    begin, end = _section_markers(key)
    section = f"{begin}\n{text.rstrip()}\n{end}\n"
    existing = report.read_text() if report.exists() else "# Results\n\nMade by `vqtool sweep --report`.\n"
    if begin in existing and end in existing:
        before, rest = existing.split(begin, 1)
        updated = before + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        updated = existing.rstrip("\n") + "\n\n" + section
    with atomic_output(report) as temp:
        temp.write_text(updated)


def publish_sweep(
    runs: Sequence[SweepRun],
    beta: float,
    out: Path,
    command: str,
    *,
    title: str | None = None,
    report: Path | None = None,
) -> list[dict[str, Any]]:
    """Summarise the runs into OUT/summary.json, OUT/summary.md and OUT/figures/, and with `report` into that
    markdown file as a section of its own; returns the summary's rows."""
    from vqtool.formats.atomic import write_bytes, write_json

    rows = summarise(runs, beta)
    figures = draw_figures(rows, out / "figures")
    # The runs' own training time, so a re-run that only re-summarises still reports what training cost.
    training_seconds = sum(float(run.final.get("elapsed_s", 0.0)) for run in runs)
    text = report_markdown(rows, figures, command, training_seconds, title=title)
    write_json(out / "summary.json", {"command": command, "rows": rows})
    write_bytes(out / "summary.md", text.encode())
    if report is not None:
        # One section per sweep folder, or per title: two summaries of one folder's runs keep both sections.
        key = out.resolve().name
        if title:
            key += "-" + "-".join("".join(c if c.isalnum() else " " for c in title.lower()).split())[:24]
        published = report_markdown(rows, figures, command, training_seconds, f"figures/{key}/", title=title)
        publish_report(published, figures, report, key)
    return rows
