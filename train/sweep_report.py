"""A sweep published: its figures, its tables, and the Markdown report (summary.md, and a section of a page of the
docs that --report names, replaced in place)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.formats.atomic import atomic_output
from vqtool.train.sweep import AXIS_TITLES, SweepRun
from vqtool.train.sweep_stats import axis_value, summarise, variant_label, varying_axes


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
        label = variant_label(row, shown)
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
    labels = [variant_label(r, shown).replace(" ", "\n") for r in rows]
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
        cells = [axis_value(r, a) for a in axes] + [
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
            lines.append("| " + " | ".join([*(axis_value(r, a) for a in axes), str(step), psnr, usage]) + " |")
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
        f"- Lowest validation MSE: {variant_label(best, axes)} "
        f"({best['val_mse']:.4f} ± {best['val_mse_ci95']:.4f}, {best['val_psnr']:.2f} dB).",
    ]
    overlapping = [
        r for r in rows if r is not best and r["val_mse"] - r["val_mse_ci95"] <= best["val_mse"] + best["val_mse_ci95"]
    ]
    if overlapping:
        tied = "; ".join(variant_label(r, axes) for r in overlapping)
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
