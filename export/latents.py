"""The latent graphs' parity (`export --latents`): each runtime that starts here runs encoder_latents and
decoder_latents at each exported precision, against the library's own code on the same images: its latents
(`encode(x).latents`) and its decode of those latents, as the model's pipeline decodes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vqtool.export.checked import started_runtimes
from vqtool.formats.manifest import LATENT_ROLES, QUANTIZE, Manifest, fitting_batch, graph_key
from vqtool.formats.records import LatentReport
from vqtool.images.quality import psnr
from vqtool.model.face import TokenizerModel
from vqtool.precisions import FP32, PRECISIONS, LatentRule
from vqtool.precisions import row as precision_row
from vqtool.runtime.base import REFERENCE, Runner


@torch.no_grad()
def library_latents(
    model: TokenizerModel, images: np.ndarray, batch: int, quantize: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """(the library's latents of `images`, N x D x h x w; its decode of them, quantising them first or not, as uint8
    images), `batch` images at a time."""
    latents, pictures = [], []
    for start in range(0, len(images), batch):
        x = model.model_input(torch.from_numpy(np.ascontiguousarray(images[start : start + batch])))
        part = model.pipeline_latents(x).float()
        latents.append(part)
        pictures.append(model.model_output(model.decode_pipeline_latents(part, quantize)).numpy())
    return torch.cat(latents), np.concatenate(pictures)


def _run(runner: Runner, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner(inputs[start : start + batch]) for start in range(0, len(inputs), batch)])


def check_latents(
    model: TokenizerModel,
    images: np.ndarray,
    encoder: Runner,
    decoder: Runner,
    *,
    runtime: str,
    precision: str,
    rule: LatentRule,
    decode: str,
    reference: tuple[torch.Tensor, np.ndarray],
    batch: int,
) -> LatentReport:
    """One runtime's latent graphs at `precision` against the library's latents and decode (`reference`), held to
    that precision's `rule`."""
    latents, pictures = reference
    ours = _run(encoder, images, batch)
    expected = latents.numpy()
    error = float(np.abs(ours - expected).max() / max(float(np.abs(expected).max()), 1e-12))
    decoded = _run(decoder, np.ascontiguousarray(expected, dtype=np.float32), batch)
    quality = psnr(pictures, decoded)
    return LatentReport(
        runtime,
        encoder.provider,
        precision,
        decode,
        len(images),
        error,
        quality,
        encoder_failures=tuple(rule.encoder_missed(error)),
        decoder_failures=tuple(rule.decoder_missed(quality)),
    )


def verify_latents(
    model: TokenizerModel,
    export_dir: Path,
    manifest: Manifest,
    images: np.ndarray,
    *,
    backends: tuple[str, ...] | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    log: Callable[[str], None] = print,
) -> tuple[LatentReport, ...]:
    """The latent graphs' parity on every runtime (but the reference) and precision they run at (`backends` and
    `precisions` limit which)."""
    batch = min(fitting_batch(manifest, role, "fp32", 16) for role in LATENT_ROLES)
    reference = library_latents(model, images, batch, manifest.latent_decode == QUANTIZE)

    def wanted(backend: str, device: str, precision: str) -> bool:
        # Checked where the export has the graph (PyTorch, which reads none: where it has latent graphs at all).
        graph = graph_key("encoder_latents", FP32 if backend == REFERENCE else precision)
        return precision_row(precision).latents is not None and graph in manifest.graphs

    reports = []
    for started in started_runtimes(
        export_dir,
        manifest,
        lambda precision: tuple((role, precision) for role in LATENT_ROLES),
        precisions=precisions,
        wanted=wanted,
        backends=backends,
    ):
        encoder, decoder = started.runners
        assert encoder is not None and decoder is not None
        log(f"parity: latents on {started.backend} ({encoder.provider}, {started.precision})")
        rule = precision_row(started.precision).latents
        assert rule is not None
        reports.append(
            check_latents(
                model,
                images,
                encoder,
                decoder,
                runtime=started.backend,
                precision=started.precision,
                rule=rule,
                decode=manifest.latent_decode,
                reference=reference,
                batch=batch,
            )
        )
    return tuple(reports)
