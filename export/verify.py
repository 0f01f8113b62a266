"""Parity of every runtime an export can run on, against the PyTorch model it came from."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.backends import BF16, INT8, NAIVE_FP16, PRECISIONS, graph_key, offers, open_runner, read_record
from vqtool.errors import VqtoolError
from vqtool.export.parity import ParityReport, Reference, check_parity, torch_reference
from vqtool.limits import DEFAULT_MAX_PIXELS
from vqtool.manifest import Manifest
from vqtool.runtime import OnnxRuntimeRunner
from vqtool.train.model import VQVAE

# Where each backend runs; the TensorRT ones are tried only where an engine or GPU exists.
RUNTIMES = (
    ("onnxruntime", "cpu"),
    ("openvino", "cpu"),
    ("onnxruntime", "cuda"),
    ("onnxruntime-trt", "cuda"),
    ("tensorrt", "cuda"),
)
NAIVE_BF16 = "bf16-naive"


@dataclass(frozen=True)
class Verification:
    """Reports for what ran, reasons for what could not, and the naive FP16 comparison if asked."""

    reports: tuple[ParityReport, ...]
    skipped: tuple[str, ...]
    naive: ParityReport | None
    naive_bf16: ParityReport | None = None

    @property
    def passed(self) -> bool:
        return bool(self.reports) and all(r.passed for r in self.reports)

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "reports": [r.to_dict() for r in self.reports],
            "skipped": list(self.skipped),
            "naive_fp16_for_comparison": self.naive.to_dict() if self.naive else None,
            "naive_bf16_for_comparison": self.naive_bf16.to_dict() if self.naive_bf16 else None,
        }


def naive_fp16_report(model: VQVAE, images: np.ndarray, reference: Reference) -> ParityReport:
    """Export an all-FP16 pair of graphs aside and measure them, to show what the FP32 island buys."""
    from vqtool.export.onnx_export import write_graphs

    with tempfile.TemporaryDirectory(prefix="vqtool-naive-fp16-") as folder:
        entries = write_graphs(model, "", Path(folder), NAIVE_FP16)
        encoder = OnnxRuntimeRunner(Path(folder) / entries[graph_key("encoder", NAIVE_FP16)].file, "cpu")
        decoder = OnnxRuntimeRunner(Path(folder) / entries[graph_key("decoder", NAIVE_FP16)].file, "cpu")
        return check_parity(
            model,
            images,
            encoder,
            decoder,
            runtime="onnxruntime",
            provider=encoder.provider,
            precision=NAIVE_FP16,
            reference=reference,
        )


def verify_export(
    model: VQVAE,
    export_dir: Path,
    manifest: Manifest,
    images: np.ndarray,
    *,
    backends: tuple[str, ...] | None = None,
    naive_fp16: bool = False,
    naive_bf16: bool = False,
    precisions: tuple[str, ...] = PRECISIONS,
    log: Callable[[str], None] = print,
) -> Verification:
    """Parity for each (backend, device, precision) that starts here; `backends` and `precisions` limit which."""
    reference = torch_reference(model, images)
    reports, skipped = [], []
    for backend, device in RUNTIMES:
        if backends is not None and backend not in backends:
            continue
        for precision in precisions:
            if graph_key("encoder", precision) not in manifest.graphs:
                continue
            if precision == INT8 and device != "cpu":
                continue  # INT8 is built for CPUs only
            if not offers(backend, precision):
                continue
            try:
                encoder = open_runner(
                    export_dir, manifest, "encoder", backend=backend, device=device, precision=precision
                ).runner
                # INT8 is an encoder only: its codes are decoded by the FP32 decoder on the same provider.
                decoder = open_runner(
                    export_dir,
                    manifest,
                    "decoder",
                    backend=backend,
                    device=device,
                    precision="fp32" if precision == INT8 else precision,
                ).runner
            except VqtoolError as exc:
                skipped.append(f"{backend} on {device} ({precision}): {str(exc).split('; ')[0]}")
                continue
            log(f"parity: {backend} on {encoder.provider} ({precision})")
            reports.append(
                check_parity(
                    model,
                    images,
                    encoder,
                    decoder,
                    runtime=backend,
                    provider=encoder.provider,
                    precision=precision,
                    reference=reference,
                )
            )
    naive = naive_fp16_report(model, images, reference) if naive_fp16 else None
    bf16_whole = naive_bf16_report(model, export_dir, manifest, images, reference) if naive_bf16 else None
    return Verification(tuple(reports), tuple(skipped), naive, bf16_whole)


def naive_bf16_report(
    model: VQVAE, export_dir: Path, manifest: Manifest, images: np.ndarray, reference: Reference
) -> ParityReport:
    """OpenVINO BF16 over the whole graphs, quantizer included: what the FP32 island buys, measured."""
    from vqtool.manifest import verify_graph
    from vqtool.openvino_runtime import OpenVinoRunner

    encoder = OpenVinoRunner(verify_graph(export_dir, manifest, "encoder"), "encoder", BF16, island=False)
    decoder = OpenVinoRunner(verify_graph(export_dir, manifest, "decoder"), "decoder", BF16, island=False)
    return check_parity(
        model, images, encoder, decoder, runtime="openvino", provider="CPU", precision=NAIVE_BF16, reference=reference
    )


def check_export(
    export_dir: Path,
    *,
    images: Path | None = None,
    backends: tuple[str, ...] | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    naive_fp16: bool = False,
    naive_bf16: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    log: Callable[[str], None] = print,
) -> Verification:
    """What `vqtool parity` does: compare an export's PyTorch model (model.pt) with every runtime that starts
    here, on `images` (default: the validation split of the checkpoint's training data); writes parity.json.

    The result's `passed` says whether every runtime held its tolerance; `reports` is empty when none started.
    """
    from vqtool.atomic import write_json
    from vqtool.backends import PYTORCH_FILE
    from vqtool.export.onnx_export import PARITY_NAME, held_out_images
    from vqtool.imagesets import read_image_set
    from vqtool.manifest import read_manifest
    from vqtool.train.checkpoint import CheckpointError, load_checkpoint

    manifest = read_manifest(export_dir)
    try:
        checkpoint = load_checkpoint(export_dir / (manifest.pytorch_file or PYTORCH_FILE))
    except CheckpointError as exc:
        raise VqtoolError(str(exc)) from None
    if images is not None:
        pixels = read_image_set(images, manifest.image_size, max_pixels=max_pixels)[0]
    else:
        pixels = held_out_images(checkpoint, log)
    verification = verify_export(
        checkpoint.model,
        export_dir,
        manifest,
        pixels,
        backends=backends,
        naive_fp16=naive_fp16,
        naive_bf16=naive_bf16,
        precisions=precisions,
        log=log,
    )
    # Reports of runtimes not checked this time (e.g. export's, when only --backend openvino ran) are kept.
    checked = {(r.runtime, r.precision) for r in verification.reports}
    earlier = read_record(export_dir / PARITY_NAME).get("reports", [])
    kept = [r for r in earlier if isinstance(r, dict) and (r.get("runtime"), r.get("precision")) not in checked]
    record = verification.to_dict()
    record["reports"] = [*kept, *record["reports"]]
    record["passed"] = all(r.get("passed") for r in record["reports"]) and bool(record["reports"])
    write_json(export_dir / PARITY_NAME, record)
    return verification
