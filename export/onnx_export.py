"""Export a checkpoint to the two ONNX graphs (and TensorRT engines), verify parity, publish the folder."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import vqtool
from vqtool.atomic import usual_mode, write_json
from vqtool.backends import BF16, INT8, PRECISIONS, PYTORCH_FILE, graph_key
from vqtool.errors import VqtoolError, missing_extra
from vqtool.export.graphs import DecoderGraph, EncoderGraph
from vqtool.export.quantize import (
    AGREEMENT_IMAGES,
    AGREEMENT_SEED,
    CALIBRATION_IMAGES,
    calibration_images,
    code_agreement,
    write_checked_int8_encoder,
)
from vqtool.export.tensorrt_build import EngineProfile
from vqtool.export.verify import Verification, verify_export
from vqtool.limits import DEFAULT_MAX_PIXELS
from vqtool.manifest import MANIFEST_NAME, GraphEntry, Manifest, code_dtype_for, sha256_file
from vqtool.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from vqtool.train.config import ModelConfig
from vqtool.train.data import TrainingData
from vqtool.train.model import VQVAE
from vqtool.train.sources import collection_exists

# The runtimes export's parity runs on (where they start); OpenVINO is left to `vqtool parity` (see export_model).
EXPORT_RUNTIMES = ("onnxruntime", "onnxruntime-trt", "tensorrt")

# TensorRT 10's ONNX parser reads opsets 9..20; 18 is well inside what every runtime we target reads.
OPSET = 18
PARITY_NAME = "parity.json"
ENCODER_INPUT, ENCODER_OUTPUT = "images", "codes"
DECODER_INPUT, DECODER_OUTPUT = "codes", "images"


@dataclass(frozen=True)
class ExportResult:
    export_dir: Path
    manifest: Manifest
    verification: Verification


class ParityFailed(VqtoolError):
    """Export finished but a runtime disagrees with PyTorch beyond tolerance."""

    def __init__(self, message: str, verification: Verification) -> None:
        super().__init__(message)
        self.verification = verification


def load_for_export(path: Path) -> Checkpoint:
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise VqtoolError(str(exc)) from None


def _training_data(checkpoint: Checkpoint, log: Callable[[str], None]) -> Path | None:
    """The data the checkpoint was trained on, or None for the embedded default data (also when it is gone)."""
    source = Path(checkpoint.data) if checkpoint.data else None
    if source is not None and not collection_exists(source):
        log(f"training data {source} is gone; using the embedded default images instead")
        source = None
    return source


def training_set_of(checkpoint: Checkpoint, log: Callable[[str], None]) -> TrainingData:
    """The data the checkpoint was trained on, read as its run read it (--max-pixels, --skip-bad, --val-data)."""
    from vqtool.train.sources import load_training_set

    config = checkpoint.train_config
    source = _training_data(checkpoint, log)
    val_data = config.val_data if source is not None else None
    if val_data is not None and not collection_exists(val_data):
        log(f"validation data {val_data} is gone; using the held-out part of {source} instead")
        val_data = None
    return load_training_set(
        source,
        checkpoint.model_config.image_size,
        max_pixels=config.max_pixels,
        skip_bad=config.skip_bad,
        val_data=val_data,
        log=log,
    )


def held_out_images(checkpoint: Checkpoint, log: Callable[[str], None]) -> np.ndarray:
    """The validation split of the data the checkpoint was trained on (the default data if that is gone)."""
    return training_set_of(checkpoint, log).val


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """torch.onnx narrates each stage on stdout and logs; keep the narration for error messages only."""
    captured = io.StringIO()
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping ..."
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        exporter_log.setLevel(level)


def _export_graph(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    names: tuple[str, str],
    spatial_scale: int,
    metadata: dict[str, str],
) -> None:
    """torch.onnx (dynamo) export with dynamic batch and spatial size, then the full ONNX checker."""
    try:
        import onnx
    except ModuleNotFoundError:
        raise missing_extra("vqtool export", "onnx", "train") from None
    batch, height, width = torch.export.Dim("batch", min=1), torch.export.Dim("h", min=1), torch.export.Dim("w", min=1)
    dims = {0: batch, 1: spatial_scale * height, 2: spatial_scale * width}
    with _quiet_exporter() as narration:
        try:
            torch.onnx.export(
                module.eval(),
                (example,),
                str(path),
                input_names=[names[0]],
                output_names=[names[1]],
                opset_version=OPSET,
                dynamic_shapes={names[0]: dims},
                external_data=False,
                dynamo=True,
            )
        except Exception as exc:
            raise VqtoolError(f"torch.onnx could not export {path.name}: {exc}\n{narration.getvalue()}") from None
    graph = onnx.load(str(path))
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))


def write_graphs(model: VQVAE, checkpoint_sha: str, out_dir: Path, precision: str) -> dict[str, GraphEntry]:
    """Export the encoder and decoder at one precision into `out_dir`; returns their manifest entries."""
    model, config = model.eval(), model.config
    size, grid = config.image_size, config.grid
    examples = torch.zeros(2, size, size, 3, dtype=torch.uint8), torch.zeros(2, grid, grid, dtype=torch.int32)
    meta = {
        "vqtool.model_config": json.dumps(config.to_dict()),
        "vqtool.checkpoint_sha256": checkpoint_sha,
        "vqtool.precision": precision,
        "vqtool.version": vqtool.__version__,
    }
    entries = {}
    encoder_name, decoder_name = graph_key("encoder", precision), graph_key("decoder", precision)
    for name, module, example, names, scale in (
        (encoder_name, EncoderGraph(model, precision), examples[0], (ENCODER_INPUT, ENCODER_OUTPUT), config.downsample),
        (decoder_name, DecoderGraph(model, precision), examples[1], (DECODER_INPUT, DECODER_OUTPUT), 1),
    ):
        path = out_dir / f"{name}.onnx"
        _export_graph(module, example, path, names, scale, {**meta, "vqtool.role": name.split(".")[0]})
        entries[name] = GraphEntry(path.name, sha256_file(path), precision, names[0], names[1])
    return entries


def _check_trt_compatible(
    out_dir: Path, entries: dict[str, GraphEntry], *, strict: bool, log: Callable[[str], None]
) -> None:
    import onnx

    from vqtool.export.trt_compat import trt_problems

    for entry in entries.values():
        problems = trt_problems(onnx.load(str(out_dir / entry.file)))
        if problems and strict:
            raise VqtoolError(f"outside what TensorRT's parser supports: {'; '.join(problems)}", out_dir / entry.file)
        for problem in problems:
            log(f"warning: {entry.file}: {problem} (TensorRT will not build it)")


def _build_engines(
    out_dir: Path,
    entries: dict[str, GraphEntry],
    config: ModelConfig,
    profile: EngineProfile,
    timing_cache: Path | None,
    log: Callable[[str], None],
) -> None:
    from vqtool.export.tensorrt_build import build_engine, default_timing_cache
    from vqtool.trt_runtime import current_gpu, import_tensorrt

    gpu = current_gpu()
    cache = timing_cache or default_timing_cache(str(import_tensorrt().__version__), gpu)
    tails = {ENCODER_INPUT: (config.image_size, config.image_size, 3), DECODER_INPUT: (config.grid, config.grid)}
    for name, entry in entries.items():
        log(f"building TensorRT engine {name}.engine ({entry.precision}) on {gpu.name}")
        build_engine(
            gpu,
            out_dir / entry.file,
            out_dir / f"{name}.engine",
            input_name=entry.input,
            output_name=entry.output,
            input_tail=tails[entry.input],
            precision=entry.precision,
            profile=profile,
            timing_cache=cache,
            log=log,
        )


def _publish(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` with `staging` so that readers see the old export or the new one, never a mix."""
    if out_dir.exists():
        backup = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(backup)
        staging.rename(out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(out_dir)


def export_model(
    checkpoint_path: Path,
    out_dir: Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    calibration: Path | None = None,
    calibration_count: int = CALIBRATION_IMAGES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    trt: bool = False,
    profile: EngineProfile | None = None,
    timing_cache: Path | None = None,
    parity_images: np.ndarray | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Write graphs (+ engines), manifest and parity.json to `out_dir`; a failed parity fails the export."""
    if trt:
        from vqtool.trt_runtime import require_tensorrt_gpu

        require_tensorrt_gpu()  # before any work: a missing TensorRT or GPU is one sentence, not a half export
    if int8 and calibration_count < 1:
        raise VqtoolError(f"--calibration-images must be at least 1, got {calibration_count}")
    if out_dir.exists() and not (out_dir / MANIFEST_NAME).is_file():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise VqtoolError("exists and is not a vqtool export folder; choose another --out", out_dir)
    checkpoint = load_for_export(checkpoint_path)
    checkpoint_sha = sha256_file(checkpoint_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    usual_mode(staging)
    try:
        entries: dict[str, GraphEntry] = {}
        for precision in ("fp32", "fp16") if fp16 else ("fp32",):
            entries.update(write_graphs(checkpoint.model, checkpoint_sha, staging, precision))
        _check_trt_compatible(staging, entries, strict=trt, log=log)
        # The checkpoint's own data is read (and its skipped files reported) once, for calibration and parity.
        own_data = functools.cache(lambda: training_set_of(checkpoint, log))
        if int8:
            # After the TensorRT check: the INT8 graph is for ONNX Runtime's CPU provider, not TensorRT.
            if calibration is not None:
                from vqtool.train.sources import load_training_set

                size = checkpoint.model_config.image_size
                data, source = load_training_set(calibration, size, max_pixels=max_pixels), str(calibration)
            else:
                data, source = own_data(), checkpoint.data or "the embedded default data"
            images = calibration_images(data, calibration_count, source, log)
            agreement = code_agreement(checkpoint.model, data.batch(0, AGREEMENT_IMAGES, seed=AGREEMENT_SEED))
            int8_entry = write_checked_int8_encoder(
                staging, entries[graph_key("encoder", "fp32")], images, agreement, log
            )
        # A slim copy of the weights travels with the graphs: parity and --backend torch need no other file.
        save_checkpoint(
            staging / PYTORCH_FILE,
            checkpoint.model,
            checkpoint.train_config,
            step=checkpoint.step,
            epoch=checkpoint.epoch,
            data=checkpoint.data,
        )
        config = checkpoint.model_config
        manifest = Manifest(
            model_config=config.to_dict(),
            image_size=config.image_size,
            grid=config.grid,
            codes=config.codes,
            code_dtype=code_dtype_for(config.codes).name,
            opset=OPSET,
            checkpoint_sha256=checkpoint_sha,
            graphs={**entries, graph_key("encoder", INT8): int8_entry} if int8 else entries,
            vqtool_version=vqtool.__version__,
            torch_version=str(torch.__version__),
            pytorch_file=PYTORCH_FILE,
            pytorch_sha256=sha256_file(staging / PYTORCH_FILE),
        )
        write_json(staging / MANIFEST_NAME, manifest.to_dict())
        if trt:
            _build_engines(staging, entries, config, profile or EngineProfile(), timing_cache, log)
        images = own_data().val if parity_images is None else parity_images
        # Every graph written, on ONNX Runtime and TensorRT wherever they start. OpenVINO (and its BF16, no graph
        # but a choice made when running) is checked by `vqtool parity --backend openvino` instead: a process that
        # has run OpenVINO crashes when it later forks PyTorch DataLoader workers (torch 2.13, OpenVINO 2026.4),
        # and export runs inside training scripts.
        written = tuple(p for p in PRECISIONS if p != BF16)
        verification = verify_export(
            checkpoint.model, staging, manifest, images, backends=EXPORT_RUNTIMES, precisions=written, log=log
        )
        write_json(staging / PARITY_NAME, verification.to_dict())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not verification.passed:
        kept = out_dir.with_name(f"{out_dir.name}.failed-parity")
        shutil.rmtree(kept, ignore_errors=True)
        staging.rename(kept)
        failed = [r for r in verification.reports if not r.passed]
        reasons = "; ".join(f"{r.runtime} {r.precision}: {', '.join(r.failures)}" for r in failed)
        raise ParityFailed(f"parity failed ({reasons}); graphs kept for inspection in {kept}", verification)
    _publish(staging, out_dir)
    return ExportResult(out_dir, manifest, verification)
