"""Figures a run leaves behind: reconstruction grids over training and loss curves (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vqtool.formats.atomic import atomic_output


def _save_png_atomically(path: Path, save: Any) -> None:
    with atomic_output(path) as temp:
        save(temp)


def save_reconstruction_grid(path: Path, inputs: np.ndarray, reconstructions: np.ndarray, scale: int = 3) -> np.ndarray:
    """Inputs on the top row, their reconstructions below (uint8 N x H x W x 3 each); returns the picture."""
    return save_image_rows(path, [inputs, reconstructions], scale=scale)


def save_image_rows(
    path: Path, rows: Sequence[np.ndarray], labels: Sequence[str] = (), scale: int = 3, label_width: int = 0
) -> np.ndarray:
    """One row per array of uint8 N x H x W x 3 images, each row optionally named at its left; returns the picture."""
    count, height, width = rows[0].shape[:3]
    gap = 2
    canvas = np.full(
        (len(rows) * (height * scale + gap) + gap, label_width + count * (width * scale + gap) + gap, 3), 255, np.uint8
    )
    for row, images in enumerate(rows):
        for col, image in enumerate(images):
            top, left = gap + row * (height * scale + gap), label_width + gap + col * (width * scale + gap)
            canvas[top : top + height * scale, left : left + width * scale] = image.repeat(scale, 0).repeat(scale, 1)
    picture = Image.fromarray(canvas)
    if labels:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(picture)
        for row, label in enumerate(labels):
            draw.text((4, gap + row * (height * scale + gap) + height * scale // 2 - 6), label, fill=(0, 0, 0))
    _save_png_atomically(path, lambda temp: picture.save(temp, format="PNG"))
    return np.asarray(picture)


def save_loss_curves(path: Path, trace: Sequence[dict[str, float]], epochs: Sequence[dict[str, Any]]) -> bool:
    """Training losses per step and validation MSE per epoch; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return False
    figure, (recon_axis, vq_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [t["step"] for t in trace]
    recon_axis.plot(steps, [t["recon"] for t in trace], label="train reconstruction (MSE)", lw=1)
    if epochs:
        recon_axis.plot([e["step"] for e in epochs], [e["val_mse"] for e in epochs], "o-", label="validation MSE")
    recon_axis.set_yscale("log")
    recon_axis.set_xlabel("step")
    recon_axis.legend()
    vq_axis.plot(steps, [t["codebook"] for t in trace], label="codebook loss", lw=1)
    vq_axis.plot(steps, [t["commit"] for t in trace], label="commitment loss", lw=1)
    vq_axis.set_yscale("log")
    vq_axis.set_xlabel("step")
    # Both terms are |z_e - e|^2; they differ only in which side receives the gradient.
    vq_axis.set_title("codebook = commitment loss in value", fontsize=9)
    vq_axis.legend()
    figure.tight_layout()
    _save_png_atomically(path, lambda temp: figure.savefig(temp, dpi=110, format="png"))
    plt.close(figure)
    return True
