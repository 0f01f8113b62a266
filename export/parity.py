"""Parity: the PyTorch model against an exported graph's runtime, on held-out images.

Codes: the fraction identical, and each differing code classified as a near-tie (the PyTorch
distances of the two codes differ by less than `tie_rtol` times the distance to PyTorch's code,
so either answer is right up to rounding) or as an unexplained mismatch, which is a defect.
Reconstructions: the decoder runtime and PyTorch decode the *same* codes (PyTorch's), so decoder
error is measured apart from encoder disagreements.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from vqtool.train.model import VQVAE, images_to_input, output_to_images

BATCH = 256


@dataclass(frozen=True)
class Tolerance:
    """What a precision must meet; None means not checked."""

    tie_rtol: float
    max_unexplained: int | None = 0
    min_identical: float | None = None
    max_abs_diff: int | None = None
    min_psnr: float | None = None
    max_quality_drop_db: float | None = None
    # Decode the runtime's own codes rather than PyTorch's: for an encoder that is allowed to differ,
    # what matters is how far its tokens move the reconstruction.
    end_to_end: bool = False


TOLERANCES = {
    # FP32 must agree exactly apart from true ties; rounding of a length-D dot product is ~1e-6.
    "fp32": Tolerance(tie_rtol=1e-5, max_abs_diff=1),
    "fp16": Tolerance(tie_rtol=1e-2, min_identical=0.995, min_psnr=40.0),
    "fp16-naive": Tolerance(tie_rtol=1e-2, min_identical=0.995, min_psnr=40.0),
    # BF16 (OpenVINO) is held to the FP16 rule: 8 mantissa bits against FP16's 11, so it is the harder one to meet.
    "bf16": Tolerance(tie_rtol=1e-2, min_identical=0.995, min_psnr=40.0),
    "bf16-naive": Tolerance(tie_rtol=1e-2, min_identical=0.995, min_psnr=40.0),
    # INT8 rounds each activation to 1/255 of its calibrated range, enough to flip codes that lie within a
    # few percent of each other. It is judged by how often it agrees and by what its codes decode to:
    # how much closer to the input images PyTorch's reconstructions are than those from INT8 codes.
    # Measured on a K = 512 model using 254 codes: 95.0% identical, no measurable drop
    # (< 0.01 dB), although its reconstructions are 38 dB from PyTorch's.
    "int8": Tolerance(
        tie_rtol=1e-2, max_unexplained=None, min_identical=0.90, max_quality_drop_db=0.5, end_to_end=True
    ),
}


@dataclass(frozen=True)
class ParityReport:
    """Agreement of one runtime (backend + precision) with the PyTorch model."""

    runtime: str
    provider: str
    precision: str
    images: int
    codes: int
    identical: int
    near_ties: int
    unexplained: int
    max_gap_rtol: float
    recon_max_abs: int
    recon_mean_abs: float
    recon_psnr: float
    quality_drop_db: float  # PSNR against the input images: PyTorch's reconstructions minus these
    decoded: str  # whose codes the reconstructions come from: "pytorch" or "own"
    failures: tuple[str, ...]

    @property
    def identical_fraction(self) -> float:
        return self.identical / self.codes

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failures"] = list(self.failures)
        out["identical_fraction"] = self.identical_fraction
        out["passed"] = self.passed
        out["recon_psnr"] = None if math.isinf(self.recon_psnr) else self.recon_psnr
        return out


@dataclass(frozen=True)
class Reference:
    """PyTorch's latents, codes and reconstructions for a set of images."""

    latents: torch.Tensor  # N x h x w x D, float32
    codes: np.ndarray  # N x h x w, int64
    reconstructions: np.ndarray  # N x H x W x 3, uint8


@torch.no_grad()
def torch_reference(model: VQVAE, images: np.ndarray) -> Reference:
    model = model.eval().to("cpu")
    latents, codes, recons = [], [], []
    for start in range(0, len(images), BATCH):
        x = images_to_input(torch.from_numpy(images[start : start + BATCH]))
        z = model.encode_latents(x)
        c = model.quantizer.nearest(z)
        latents.append(z)
        codes.append(c)
        recons.append(output_to_images(model.decode(c)))
    return Reference(torch.cat(latents), torch.cat(codes).numpy(), torch.cat(recons).numpy())


def classify_mismatches(reference: Reference, codebook: torch.Tensor, other: np.ndarray, rtol: float):
    """(near_ties, unexplained, largest relative distance gap) among codes that differ.

    A near-tie is a pair whose distances differ by less than `rtol` times |z|^2 + |e|^2: the distance is
    computed as |z|^2 - 2 z.e + |e|^2, whose rounding error scales with those terms, not with the distance
    itself. The two differ where latents lie close to their codes, as l2-normalised ones do (distance
    ~0.01 from terms ~2): there, judging by the distance would call rounding a defect.
    """
    where = np.nonzero(reference.codes != other)
    if len(where[0]) == 0:
        return 0, 0, 0.0
    z = reference.latents[where].to(torch.float64)
    book = codebook.to(torch.float64)
    ours = torch.from_numpy(reference.codes[where])
    theirs = torch.from_numpy(other[where].astype(np.int64))
    d_ours = ((z - book[ours]) ** 2).sum(-1)
    d_theirs = ((z - book[theirs]) ** 2).sum(-1)
    difference = (d_theirs - d_ours).abs()
    scale = (z * z).sum(-1) + torch.maximum((book[ours] ** 2).sum(-1), (book[theirs] ** 2).sum(-1))
    ties = int((difference <= rtol * scale).sum().item())
    gap = difference / d_ours.clamp_min(1e-30)
    return ties, len(gap) - ties, float(gap.max().item())


def check_parity(
    model: VQVAE,
    images: np.ndarray,
    encode: Callable[[np.ndarray], np.ndarray],
    decode: Callable[[np.ndarray], np.ndarray],
    *,
    runtime: str,
    provider: str,
    precision: str,
    reference: Reference | None = None,
) -> ParityReport:
    """Compare PyTorch with `encode`/`decode` (uint8 images -> codes, int32 codes -> uint8 images)."""
    tolerance = TOLERANCES[precision]
    reference = reference or torch_reference(model, images)
    codes = np.concatenate([encode(images[s : s + BATCH]) for s in range(0, len(images), BATCH)])
    if codes.shape != reference.codes.shape:
        raise ValueError(f"{runtime}: codes shaped {codes.shape}, PyTorch gives {reference.codes.shape}")
    decoded = (codes if tolerance.end_to_end else reference.codes).astype(np.int32)
    recons = np.concatenate([decode(decoded[s : s + BATCH]) for s in range(0, len(images), BATCH)])
    codebook = model.quantizer.search_codebook().detach().cpu()
    ties, unexplained, max_gap = classify_mismatches(reference, codebook, codes, tolerance.tie_rtol)
    diff = np.abs(recons.astype(np.int16) - reference.reconstructions.astype(np.int16))
    mse = float((diff.astype(np.float64) ** 2).mean())
    quality_drop = _psnr(reference.reconstructions, images) - _psnr(recons, images)
    report = dict(
        runtime=runtime,
        provider=provider,
        precision=precision,
        images=len(images),
        codes=int(codes.size),
        identical=int((codes == reference.codes).sum()),
        near_ties=ties,
        unexplained=unexplained,
        max_gap_rtol=max_gap,
        recon_max_abs=int(diff.max()),
        recon_mean_abs=float(diff.mean()),
        recon_psnr=math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse),
        quality_drop_db=quality_drop,
        decoded="own" if tolerance.end_to_end else "pytorch",
    )
    return ParityReport(**report, failures=tuple(_failures(report, tolerance)))  # type: ignore[arg-type]


def _psnr(images: np.ndarray, target: np.ndarray) -> float:
    mse = float(((images.astype(np.float64) - target.astype(np.float64)) ** 2).mean())
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


def _failures(report: dict[str, Any], tolerance: Tolerance) -> list[str]:
    failures = []
    if tolerance.max_unexplained is not None and report["unexplained"] > tolerance.max_unexplained:
        failures.append(f"{report['unexplained']} codes differ from PyTorch without a near-tie to explain them")
    identical = report["identical"] / report["codes"]
    if tolerance.min_identical is not None and identical < tolerance.min_identical:
        failures.append(f"{identical:.2%} identical codes, below {tolerance.min_identical:.1%}")
    if tolerance.max_abs_diff is not None and report["recon_max_abs"] > tolerance.max_abs_diff:
        failures.append(
            f"reconstructions differ by up to {report['recon_max_abs']} grey levels (> {tolerance.max_abs_diff})"
        )
    if tolerance.min_psnr is not None and report["recon_psnr"] < tolerance.min_psnr:
        failures.append(f"reconstruction PSNR against PyTorch {report['recon_psnr']:.1f} dB < {tolerance.min_psnr} dB")
    drop = tolerance.max_quality_drop_db
    if drop is not None and report["quality_drop_db"] > drop:
        failures.append(f"reconstructions {report['quality_drop_db']:.2f} dB further from the images (> {drop} dB)")
    return failures
