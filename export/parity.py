"""Parity: the PyTorch model against an exported graph's runtime, on held-out images.

Codes: the fraction identical, and each differing code classified as a near-tie (the PyTorch
distances of the two codes differ by less than `tie_rtol` times the distance to PyTorch's code,
so either answer is right up to rounding) or as an unexplained mismatch, which is a defect.
Reconstructions: the decoder runtime and PyTorch decode the *same* codes (PyTorch's), so decoder
error is measured apart from encoder disagreements.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqtool.data.whole import read_image_set
from vqtool.errors import VqtoolError
from vqtool.export.checked import started_runtimes
from vqtool.export.drift import measure_drift, torch_decoder
from vqtool.export.graphs import write_graphs
from vqtool.export.latents import verify_latents
from vqtool.formats.atomic import write_json
from vqtool.formats.lock import output_lock
from vqtool.formats.manifest import (
    PARITY_NAME,
    Manifest,
    fitting_batch,
    graph_key,
    read_manifest,
    verify_graph,
    verify_pytorch_file,
)
from vqtool.formats.records import LatentReport, ParityReport, judged, read_latent_reports, read_parity_reports
from vqtool.host import cpu_description
from vqtool.images.embedded import embedded_photographs
from vqtool.images.fit import Fit
from vqtool.images.limits import DEFAULT_MAX_PIXELS
from vqtool.images.quality import psnr
from vqtool.model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from vqtool.model.face import TokenizerModel
from vqtool.precisions import (
    FP32,
    NAIVE_BF16,
    NAIVE_FP16,
    PRECISIONS,
    ParityRule,
    decoder_precision,
)
from vqtool.precisions import row as precision_row
from vqtool.runtime.base import REFERENCE, GraphToOpen, Runner
from vqtool.runtime.select import open_backend
from vqtool.train.data.memory import TrainingData
from vqtool.train.data.run_data import training_set_of

BATCH = 256


@dataclass(frozen=True)
class Reference:
    """PyTorch's latents, codes and reconstructions for a set of images."""

    latents: torch.Tensor  # N x h x w x D, float32
    codes: np.ndarray  # N x h x w, int64
    reconstructions: np.ndarray | None  # N x H x W x 3, uint8; None for a model with no decoder


@torch.no_grad()
def torch_reference(model: TokenizerModel, images: np.ndarray, *, batch: int = BATCH, decode: bool = True) -> Reference:
    """PyTorch's latents, codes and (unless `decode` is False) reconstructions, `batch` images at a time."""
    model = model.eval().to("cpu")
    latents, codes, recons = [], [], []
    for start in range(0, len(images), batch):
        z = model.encode_latents(model.model_input(torch.from_numpy(images[start : start + batch])))
        c = model.quantizer.nearest(z)
        latents.append(z)
        codes.append(c)
        if model.has_decoder and decode:
            recons.append(model.model_output(model.decode(c)))
    reconstructions = torch.cat(recons).numpy() if recons else None
    return Reference(torch.cat(latents), torch.cat(codes).numpy(), reconstructions)


def classify_mismatches(reference: Reference, codebook: torch.Tensor, other: np.ndarray, rtol: float):
    """(near_ties, unexplained, largest relative distance gap) among codes that differ from PyTorch's."""
    return classify_pairs(reference.latents, codebook, reference.codes, other, rtol)


def classify_pairs(latents: torch.Tensor, codebook: torch.Tensor, ours: np.ndarray, other: np.ndarray, rtol: float):
    """(near_ties, unexplained, largest relative distance gap) among the places where two code grids differ.

    A near-tie is a pair whose distances differ by less than `rtol` times |z|^2 + |e|^2: the distance is
    computed as |z|^2 - 2 z.e + |e|^2, whose rounding error scales with those terms, not with the distance
    itself. The two differ where latents lie close to their codes, as l2-normalised ones do (distance
    ~0.01 from terms ~2): there, judging by the distance would call rounding a defect.
    """
    where = np.nonzero(ours != other)
    if len(where[0]) == 0:
        return 0, 0, 0.0
    z = latents[where].to(torch.float64)
    book = codebook.to(torch.float64)
    first = torch.from_numpy(ours[where].astype(np.int64))
    second = torch.from_numpy(other[where].astype(np.int64))
    d_first = ((z - book[first]) ** 2).sum(-1)
    d_second = ((z - book[second]) ** 2).sum(-1)
    difference = (d_second - d_first).abs()
    scale = (z * z).sum(-1) + torch.maximum((book[first] ** 2).sum(-1), (book[second] ** 2).sum(-1))
    ties = int((difference <= rtol * scale).sum().item())
    gap = difference / d_first.clamp_min(1e-30)
    return ties, len(gap) - ties, float(gap.max().item())


# Batch invariance: the first images of the parity set encoded alone and in batches of these sizes, against the
# parity run's codes for the same images: the sizes below the parity run's own batch, and 4 (a serving batch of
# large images) where the activation budget holds the parity run to fewer.
INVARIANCE_BATCHES = (1, 4, 16, 64)
SMALL_BATCH = 4


def batch_invariance(
    encode: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    codes: np.ndarray,
    reference: Reference,
    codebook: torch.Tensor,
    rtol: float,
    batch: int,
) -> dict[str, Any]:
    """How far an image's codes depend on what it is batched with: the share identical (the lowest over the batch
    sizes tried) and how many differences are not near-ties."""
    count = min(len(images), max(INVARIANCE_BATCHES))
    sizes = [size for size in INVARIANCE_BATCHES if size < min(max(batch, SMALL_BATCH + 1), len(images))]
    sizes = [size for size in sizes if size != batch]
    identical, unexplained = 1.0, 0
    for size in sizes:
        alone = np.concatenate([encode(images[s : min(s + size, count)]) for s in range(0, count, size)])
        _, differing, _ = classify_pairs(reference.latents[:count], codebook, codes[:count], alone, rtol)
        identical = min(identical, float((alone == codes[:count]).mean()))
        unexplained += differing
    return dict(batch_sizes=tuple(sizes), batch_identical=identical, batch_unexplained=unexplained)


def check_parity(
    model: TokenizerModel,
    images: np.ndarray,
    encode: Callable[[np.ndarray], np.ndarray],
    decode: Callable[[np.ndarray], np.ndarray] | None,
    *,
    runtime: str,
    provider: str,
    precision: str,
    reference: Reference | None = None,
    batch: int = BATCH,
    min_identical: float = 0.0,
) -> ParityReport:
    """Compare PyTorch with `encode`/`decode` (uint8 images -> codes, int32 codes -> uint8 images), `batch` images
    at a time; with no `decode` (a model with no decoder), codes alone. The report says which contract the
    runtime meets: the precision's own rule (exact), else the bounded one (asking at least `min_identical` of the
    codes to be identical), else none, and the codes' drift and batch invariance."""
    tolerance = precision_row(precision).rule
    reference = reference or torch_reference(model, images, batch=batch)
    codes = np.concatenate([encode(images[s : s + batch]) for s in range(0, len(images), batch)])
    if codes.shape != reference.codes.shape:
        raise ValueError(f"{runtime}: codes shaped {codes.shape}, PyTorch gives {reference.codes.shape}")
    codebook = model.quantizer.search_codebook().detach().cpu()
    ties, unexplained, max_gap = classify_mismatches(reference, codebook, codes, tolerance.tie_rtol)
    report: dict[str, Any] = dict(
        runtime=runtime,
        provider=provider,
        precision=precision,
        cpu=cpu_description(),
        images=len(images),
        codes=int(codes.size),
        identical=int((codes == reference.codes).sum()),
        near_ties=ties,
        unexplained=unexplained,
        max_gap_rtol=max_gap,
        decoded="none",
    )
    report.update(batch_invariance(encode, images, codes, reference, codebook, tolerance.tie_rtol, batch))
    if decode is not None and reference.reconstructions is not None:
        report.update(_reconstruction_report(images, codes, reference, decode, tolerance, batch))
    drift = measure_drift(
        reference,
        codebook,
        codes,
        torch_decoder(model, batch) if model.has_decoder else None,
        images if model.trained_by_vqtool else None,
    )
    report.update(asdict(drift))
    return judged(ParityReport(**report), min_identical)


def _reconstruction_report(
    images: np.ndarray,
    codes: np.ndarray,
    reference: Reference,
    decode: Callable[[np.ndarray], np.ndarray],
    tolerance: ParityRule,
    batch: int,
) -> dict[str, Any]:
    """How the decoder's images compare with PyTorch's, decoding its own codes or PyTorch's (by the rule)."""
    assert reference.reconstructions is not None
    decoded = (codes if tolerance.end_to_end else reference.codes).astype(np.int32)
    recons = np.concatenate([decode(decoded[s : s + batch]) for s in range(0, len(images), batch)])
    diff = np.abs(recons.astype(np.int16) - reference.reconstructions.astype(np.int16))
    return dict(
        recon_max_abs=int(diff.max()),
        recon_mean_abs=float(diff.mean()),
        recon_psnr=psnr(recons, reference.reconstructions),
        quality_drop_db=psnr(reference.reconstructions, images) - psnr(recons, images),
        decoded="own" if tolerance.end_to_end else "pytorch",
    )


def default_parity_images(checkpoint: Checkpoint, own_data: Callable[[], TrainingData]) -> np.ndarray:
    """What parity compares on unless told: the held-out part of the data a vqtool model was trained on; for an
    imported model, the embedded photographs at its own size (the data it was trained on is not here)."""
    if not checkpoint.model.trained_by_vqtool:
        return embedded_photographs(checkpoint.model_config.image_size)
    return own_data().val


# ---- every runtime of an export ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    """Reports for what ran, reasons for what could not, and the naive FP16 comparison if asked."""

    reports: tuple[ParityReport, ...]
    skipped: tuple[str, ...]
    naive: ParityReport | None
    naive_bf16: ParityReport | None = None
    latents: tuple[LatentReport, ...] = ()  # the latent graphs', where export wrote them (export/latents.py)

    @property
    def passed(self) -> bool:
        return bool(self.reports) and all(r.passed for r in self.reports) and all(r.passed for r in self.latents)

    @property
    def exact_held(self) -> bool:
        """Whether FP32 met its exact rule wherever it ran: without that there is no export to publish."""
        fp32 = [r for r in self.reports if r.precision == FP32]
        latents = [r for r in self.latents if r.precision == FP32]
        return bool(fp32) and all(r.passed for r in fp32) and all(r.passed for r in latents)

    @property
    def refused(self) -> tuple[ParityReport, ...]:
        """The reduced precisions that met no contract: refused, while the rest of the export stands."""
        return tuple(r for r in self.reports if not r.passed and r.precision != FP32)

    def joined(self, other: Verification) -> Verification:
        """Both verifications' reports and reasons, with this one's comparisons."""
        return Verification(
            self.reports + other.reports,
            self.skipped + other.skipped,
            self.naive,
            self.naive_bf16,
            self.latents + other.latents,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "reports": [r.to_dict() for r in self.reports],
            "skipped": list(self.skipped),
            "naive_fp16_for_comparison": self.naive.to_dict() if self.naive else None,
            "naive_bf16_for_comparison": self.naive_bf16.to_dict() if self.naive_bf16 else None,
            "latents": [r.to_dict() for r in self.latents],
        }


def naive_fp16_report(
    model: TokenizerModel, manifest: Manifest, images: np.ndarray, reference: Reference
) -> ParityReport:
    """Export an all-FP16 pair of graphs aside and measure them, to show what the FP32 island buys."""
    with tempfile.TemporaryDirectory(prefix="vqtool-naive-fp16-") as folder:
        entries = write_graphs(model, "", Path(folder), NAIVE_FP16)
        runners = {}
        for role in manifest.roles:
            graph = GraphToOpen(Path(folder) / entries[graph_key(role, NAIVE_FP16)].file, role, NAIVE_FP16, "cpu")
            runners[role] = open_backend("onnxruntime", graph)
        return check_parity(
            model,
            images,
            runners["encoder"],
            runners.get("decoder"),
            runtime="onnxruntime",
            provider=runners["encoder"].provider,
            precision=NAIVE_FP16,
            reference=reference,
        )


def naive_bf16_report(
    model: TokenizerModel,
    export_dir: Path,
    manifest: Manifest,
    images: np.ndarray,
    reference: Reference,
    skipped: list[str],
) -> ParityReport | None:
    """OpenVINO BF16 over the whole graphs, quantizer included: what the FP32 island buys, measured; None, and the
    reason in `skipped`, where OpenVINO does not start at BF16 here (a CPU without BF16 arithmetic). A graph that
    fails its manifest check is an error, as everywhere."""
    paths = {role: verify_graph(export_dir, manifest, graph_key(role, NAIVE_BF16)) for role in manifest.roles}
    runners: dict[str, Runner] = {}
    try:
        try:
            for role, path in paths.items():
                runners[role] = open_backend("openvino", GraphToOpen(path, role, NAIVE_BF16, "cpu"))
        except VqtoolError as exc:
            skipped.append(f"openvino on cpu ({NAIVE_BF16}): {str(exc).split('; ')[0]}")
            return None
        return check_parity(
            model,
            images,
            runners["encoder"],
            runners.get("decoder"),
            runtime="openvino",
            provider="CPU",
            precision=NAIVE_BF16,
            reference=reference,
        )
    finally:
        for runner in runners.values():
            runner.close()


def verify_export(
    model: TokenizerModel,
    export_dir: Path,
    manifest: Manifest,
    images: np.ndarray,
    *,
    backends: tuple[str, ...] | None = None,
    naive_fp16: bool = False,
    naive_bf16: bool = False,
    precisions: tuple[str, ...] = PRECISIONS,
    min_identical: float = 0.0,
    log: Callable[[str], None] = print,
) -> Verification:
    """Parity for each runtime in the table (but the reference: PyTorch's FP32 on the CPU) and each precision it
    runs that starts here, PyTorch's reduced precisions included;
    `backends` and `precisions` limit which; `min_identical`, the share of identical codes the bounded contract
    asks for. Batches hold as many images as the graphs' activations allow."""
    batch = min(fitting_batch(manifest, role, FP32, BATCH) for role in manifest.roles)
    reference = torch_reference(model, images, batch=batch)

    def wanted(backend: str, device: str, precision: str) -> bool:
        # A precision is checked where the export has its graph (PyTorch: where it was exported at all).
        return backend == REFERENCE or graph_key("encoder", precision) in manifest.graphs

    def graphs_at(precision: str) -> tuple[tuple[str, str] | None, ...]:
        # An encoder-only precision's codes are decoded by the FP32 decoder on the same provider.
        decoder = ("decoder", decoder_precision(precision)) if "decoder" in manifest.roles else None
        return (("encoder", precision), decoder)

    reports: list[ParityReport] = []
    skipped: list[str] = []
    for started in started_runtimes(
        export_dir, manifest, graphs_at, precisions=precisions, wanted=wanted, backends=backends, skipped=skipped
    ):
        encoder, decoder = started.runners
        assert encoder is not None
        log(f"parity: {started.backend} on {encoder.provider} ({started.precision})")
        reports.append(
            check_parity(
                model,
                images,
                encoder,
                decoder,
                runtime=started.backend,
                provider=encoder.provider,
                precision=started.precision,
                reference=reference,
                batch=batch,
                min_identical=min_identical,
            )
        )
    naive = naive_fp16_report(model, manifest, images, reference) if naive_fp16 else None
    bf16_whole = naive_bf16_report(model, export_dir, manifest, images, reference, skipped) if naive_bf16 else None
    return Verification(tuple(reports), tuple(skipped), naive, bf16_whole)


def check_export(
    export_dir: Path,
    *,
    images: Path | None = None,
    backends: tuple[str, ...] | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    naive_fp16: bool = False,
    naive_bf16: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    crop: str = "resize",
    min_identical: float = 0.0,
    log: Callable[[str], None] = print,
) -> Verification:
    """What `vqtool parity` does: compare an export's PyTorch model (model.pt) with every runtime that starts
    here, on `images` (default: the validation split of the checkpoint's training data); writes parity.json.

    The result's `passed` says whether every runtime held its tolerance; `reports` is empty when none started.
    Reports of runtimes not checked this time (e.g. export's, when only --backend openvino ran) are kept.
    """
    read_manifest(export_dir)  # a folder that holds no export is refused before its lock is made beside it
    # parity.json is read, merged with this run's reports and written again: one writer at a time, and no export
    # replacing the graphs meanwhile.
    with output_lock(export_dir):
        manifest = read_manifest(export_dir)
        try:
            checkpoint = load_checkpoint(verify_pytorch_file(export_dir, manifest))
        except CheckpointError as exc:
            raise VqtoolError(str(exc)) from None
        if images is not None:
            pixels = read_image_set(images, manifest.image_size, fit=Fit.of(True, crop, max_pixels))[0]
        else:
            pixels = default_parity_images(checkpoint, lambda: training_set_of(checkpoint, log))
        verification = verify_export(
            checkpoint.model,
            export_dir,
            manifest,
            pixels,
            backends=backends,
            naive_fp16=naive_fp16,
            naive_bf16=naive_bf16,
            precisions=precisions,
            min_identical=min_identical,
            log=log,
        )
        if manifest.latent_decode:
            latents = verify_latents(
                checkpoint.model, export_dir, manifest, pixels, backends=backends, precisions=precisions, log=log
            )
            verification = replace(verification, latents=latents)
        checked = {(r.runtime, r.precision) for r in verification.reports}
        kept = [r for r in read_parity_reports(export_dir) if (r.runtime, r.precision) not in checked]
        reports = [*kept, *verification.reports]
        checked_latents = {(r.runtime, r.precision) for r in verification.latents}
        kept_latents = [r for r in read_latent_reports(export_dir) if (r.runtime, r.precision) not in checked_latents]
        record: dict[str, Any] = {
            **verification.to_dict(),
            "reports": [r.to_dict() for r in reports],
            "latents": [r.to_dict() for r in (*kept_latents, *verification.latents)],
        }
        record["passed"] = bool(reports) and all(r.passed for r in reports)
        write_json(export_dir / PARITY_NAME, record)
        return verification
