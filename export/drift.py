"""What a runtime's codes change against the exact FP32 codes: how much worse each changed code is for its latent,
how far down the latent's list of nearest codes it sits, and what the codes decode to.

Regret: a changed code's extra squared distance to the FP32 latent, divided by the model's mean quantisation error
on the same images (the mean squared distance of every latent to its exact code), so that it reads the same for a
dense codebook and a sparse one: 1.0 is a code as much farther as an average code is far. Rank: 0 is the nearest
code, 1 the second nearest, and so on. Decode PSNR: PyTorch's decoder on the runtime's codes against the same
decoder on the exact codes, so the decoder's own rounding stays out of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from vqtool.formats.records import Drift
from vqtool.images.quality import psnr

if TYPE_CHECKING:
    from vqtool.export.parity import Reference
    from vqtool.model.face import TokenizerModel


def _percentile(values: np.ndarray, q: float, method: Literal["linear", "inverted_cdf"] = "linear") -> float:
    return float(np.percentile(values, q, method=method)) if len(values) else 0.0


def regret_and_rank(reference: Reference, codebook: torch.Tensor, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each changed code's regret (extra squared distance over the mean quantisation error) and rank, in float64."""
    book = codebook.detach().to(torch.float64)
    latents = reference.latents.to(torch.float64)
    exact = torch.from_numpy(reference.codes.astype(np.int64))
    errors = ((latents - book[exact]) ** 2).sum(-1)
    mean_error = max(float(errors.mean()), 1e-30)
    where = np.nonzero(reference.codes != codes)
    if len(where[0]) == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    z = latents[where]
    theirs = torch.from_numpy(codes[where].astype(np.int64))
    distances = torch.cdist(z, book) ** 2  # only the changed latents: a few thousand at most
    chosen = distances.gather(1, theirs[:, None])
    regret = (chosen[:, 0] - errors[where]) / mean_error
    rank = (distances < chosen).sum(1)
    return regret.numpy(), rank.numpy()


@torch.no_grad()
def measure_drift(
    reference: Reference,
    codebook: torch.Tensor,
    codes: np.ndarray,
    decode: Callable[[np.ndarray], np.ndarray] | None,
    images: np.ndarray | None,
) -> Drift:
    """The drift of `codes` from the reference's exact codes. `decode`: PyTorch's decoder (int64 codes -> uint8
    images), to decode the images whose codes changed; `images`: the inputs, for a model vqtool trained (their
    PSNR is then compared too)."""
    regret, rank = regret_and_rank(reference, codebook, codes)
    drift = Drift(
        regret_p50=_percentile(regret, 50),
        regret_p99=_percentile(regret, 99),
        regret_max=float(regret.max()) if len(regret) else 0.0,
        # A rank is a whole place among the nearest codes: the nearest-rank percentile keeps it one.
        rank_p50=_percentile(rank, 50, "inverted_cdf"),
        rank_p99=_percentile(rank, 99, "inverted_cdf"),
        rank_max=int(rank.max()) if len(rank) else 0,
    )
    exact = reference.reconstructions
    if decode is None or exact is None or not len(regret):
        return drift
    touched = np.flatnonzero((reference.codes != codes).reshape(len(codes), -1).any(1))
    decoded = exact.copy()
    decoded[touched] = decode(codes[touched].astype(np.int64))
    quality = None if images is None else psnr(decoded, images) - psnr(exact, images)
    return replace(drift, drift_psnr=psnr(decoded, exact), quality_change_db=quality)


def torch_decoder(model: TokenizerModel, batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """PyTorch's decoder as a function of int64 codes, `batch` grids at a time."""

    @torch.no_grad()
    def decode(codes: np.ndarray) -> np.ndarray:
        parts = [
            model.model_output(model.decode(torch.from_numpy(codes[s : s + batch])))
            for s in range(0, len(codes), batch)
        ]
        return torch.cat(parts).numpy()

    return decode
