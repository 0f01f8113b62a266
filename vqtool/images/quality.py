"""How close two sets of uint8 images are: the one PSNR formula that training, parity and benchmarks report."""

from __future__ import annotations

import math

import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB between uint8 images of one shape, peak 255; infinite when they are identical."""
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
