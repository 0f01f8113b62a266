"""Validation figures: reconstruction error, PSNR, and how much of the codebook is in use."""

from __future__ import annotations

import math

import numpy as np
import torch

from vqtool.images.quality import psnr
from vqtool.model.vqvae import VQVAE, images_to_input, output_to_images


def code_usage(codes: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Fraction of the K codes used at least once, and the perplexity of the code histogram."""
    counts = torch.bincount(codes.flatten().to(torch.int64), minlength=num_codes).to(torch.float64)
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
    used = int((counts > 0).sum().item())
    return {"usage": used / num_codes, "codes_used": float(used), "perplexity": math.exp(entropy)}


def mean_ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean structural similarity (scikit-image's, per image, over the colour channels) of uint8 N x H x W x 3."""
    from skimage.metrics import structural_similarity

    # SSIM's default 7x7 window needs sides of 7 or more; smaller images take the largest odd window that fits.
    side = min(reference.shape[1:3])
    if side < 3:
        return math.nan
    window = min(7, side if side % 2 else side - 1)
    scores = [
        structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=window)
        for a, b in zip(reference, test, strict=True)
    ]
    return float(np.mean(scores))


@torch.no_grad()
def evaluate(model: VQVAE, images: torch.Tensor, batch_size: int = 512) -> tuple[dict[str, float], torch.Tensor]:
    """Validation metrics on uint8 N x H x W x 3 images (on the model's device), and the codes they got."""
    was_training = model.training
    model.eval()
    totals = {"val_mse": 0.0, "val_codebook_loss": 0.0, "val_commit_loss": 0.0}
    all_codes, all_pixels = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        result = model(images_to_input(chunk))
        weight = len(chunk) / len(images)
        totals["val_mse"] += result.recon_loss.item() * weight
        totals["val_codebook_loss"] += result.codebook_loss.item() * weight
        totals["val_commit_loss"] += result.commit_loss.item() * weight
        all_codes.append(result.codes)
        all_pixels.append(output_to_images(result.reconstruction))
    model.train(was_training)
    codes = torch.cat(all_codes)
    reference, reconstructed = images.cpu().numpy(), torch.cat(all_pixels).cpu().numpy()
    metrics = {
        **totals,
        "val_psnr": psnr(reference, reconstructed),
        "val_ssim": mean_ssim(reference, reconstructed),
        **code_usage(codes, model.config.codes),
    }
    return metrics, codes
