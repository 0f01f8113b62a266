"""`vqtool export`, step by step: graphs, INT8, manifest, TensorRT engines, parity, then the folder published whole.

Everything is written to a staging folder beside the target and renamed into place at the end, so readers see
the old export or the new one, never a mix; FP32 failing parity keeps the graphs aside for inspection, while a
reduced precision that meets no contract is refused on its own (recorded, never started) and the rest published.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vqtool
from vqtool.errors import VqtoolError
from vqtool.export.checked import not_started
from vqtool.export.graphs import (
    DECODER_INPUT,
    ENCODER_INPUT,
    OPSET,
    refuse_latents_without_decoder,
    write_graphs,
    write_latent_graphs,
)
from vqtool.export.latents import verify_latents
from vqtool.export.parity import Verification, default_parity_images, verify_export
from vqtool.export.quantize import (
    AGREEMENT_CODES,
    AGREEMENT_IMAGES,
    AGREEMENT_SEED,
    CALIBRATION_IMAGES,
    bounded_judge,
    calibration_images,
    write_checked_int8_encoder,
)
from vqtool.export.tensorrt import EngineProfile
from vqtool.export.tensorrt_ops import trt_problems
from vqtool.formats.atomic import usual_mode, write_json
from vqtool.formats.lock import output_lock
from vqtool.formats.manifest import (
    LATENT_DECODES,
    LATENT_ROLES,
    MANIFEST_NAME,
    PARITY_NAME,
    PYTORCH_FILE,
    QUANTIZE,
    ROLES,
    GraphEntry,
    Manifest,
    code_dtype_for,
    graph_key,
    read_manifest,
    sha256_file,
    verify_pytorch_file,
)
from vqtool.formats.outputs import check_export_target, remove_export, replace_export
from vqtool.formats.records import LatentReport
from vqtool.images.embedded import embedded_photographs
from vqtool.images.fit import CENTER, Fit
from vqtool.images.limits import DEFAULT_MAX_PIXELS
from vqtool.model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from vqtool.model.config import ModelConfig
from vqtool.model.imported import ImportedConfig
from vqtool.precisions import BF16, FP16, FP32, INT8, PRECISIONS
from vqtool.precisions import row as precision_row
from vqtool.runtime.base import CHECKED_BACKENDS, REFERENCE
from vqtool.train.data.memory import TrainingData
from vqtool.train.data.run_data import training_set_of

# The runtimes export's parity runs on (where they start). OpenVINO (and its BF16, no graph but a choice made
# when running) is checked by `vqtool parity --backend openvino` instead: a process that has run OpenVINO crashes
# when it later forks PyTorch DataLoader workers (torch 2.13, OpenVINO 2026.4), and export runs inside training
# scripts.
EXPORT_RUNTIMES = tuple(b for b in CHECKED_BACKENDS if b != "openvino")


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


def _check_trt_compatible(
    out_dir: Path, entries: dict[str, GraphEntry], *, strict: bool, log: Callable[[str], None]
) -> None:
    import onnx

    for entry in entries.values():
        problems = trt_problems(onnx.load(str(out_dir / entry.file)))
        if problems and strict:
            raise VqtoolError(f"outside what TensorRT's parser supports: {'; '.join(problems)}", out_dir / entry.file)
        for problem in problems:
            log(f"warning: {entry.file}: {problem} (TensorRT will not build it)")


def _build_engines(
    out_dir: Path,
    entries: dict[str, GraphEntry],
    config: ModelConfig | ImportedConfig,
    profile: EngineProfile,
    timing_cache: Path | None,
    log: Callable[[str], None],
) -> None:
    from vqtool.export.tensorrt import build_engine, default_timing_cache
    from vqtool.runtime.tensorrt import current_gpu, import_tensorrt

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


def _bf16_parity(export_dir: Path, images: np.ndarray, min_identical: float) -> Verification:
    """OpenVINO BF16's parity on `images`, run in a fresh process (see EXPORT_RUNTIMES); its reports are empty, and
    its skipped list says why, where it cannot run here (no OpenVINO, or a CPU without BF16)."""
    return _in_a_fresh_process(functools.partial(_openvino_bf16_parity, export_dir, images, min_identical))


def refuse_bf16_that_nothing_runs() -> None:
    """`--bf16` where no runtime of the precision table's BF16 row can run it here (no GPU, and neither PyTorch nor
    OpenVINO has BF16 arithmetic on this CPU): the refusal parity would give after the whole FP32 export, given
    before anything is read or written. Where one runtime might run it, parity decides, as for every precision."""
    from vqtool.runtime.openvino import bf16_missing  # imports OpenVINO only when called, in its own process
    from vqtool.runtime.pytorch import arithmetic_missing

    runtimes = precision_row(BF16).runtimes
    if torch.cuda.is_available() and any(device != "cpu" for _, device in runtimes):
        return  # a GPU's runtimes are for parity to try
    reasons = []
    # PyTorch's own check first: where it has BF16 (every CPU with AVX-512 BF16 or AMX), no process is started.
    for backend, device in sorted(runtimes, key=lambda runtime: runtime[0] != REFERENCE):
        if device != "cpu":
            continue
        if backend == REFERENCE:
            missing = arithmetic_missing(torch, device, BF16)
        elif backend == "openvino":
            missing = _in_a_fresh_process(bf16_missing)
        else:
            return  # a runtime this check does not know: parity decides
        if missing is None:
            return
        reasons.append(not_started(backend, device, BF16, missing))
    raise _bf16_refused(reasons)


def _bf16_refused(reasons: list[str]) -> VqtoolError:
    """The one line `--bf16` is refused with, where no runtime ran it: each runtime's reason."""
    return VqtoolError(f"--bf16: {'; '.join(reasons) or 'BF16 ran on no runtime here'}")


def _in_a_fresh_process(call: Callable[[], Any]) -> Any:
    """`call()` in a spawned process: OpenVINO must stay out of this one, which forks reader processes later."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(call).result()


def _openvino_bf16_parity(export_dir: Path, images: np.ndarray, min_identical: float) -> Verification:
    manifest = read_manifest(export_dir)
    checkpoint = load_for_export(verify_pytorch_file(export_dir, manifest))
    verification = verify_export(
        checkpoint.model,
        export_dir,
        manifest,
        images,
        backends=("openvino",),
        precisions=(BF16,),
        min_identical=min_identical,
        log=lambda _: None,
    )
    if not manifest.latent_decode or not verification.reports:
        return verification
    latents = verify_latents(
        checkpoint.model, export_dir, manifest, images, backends=("openvino",), precisions=(BF16,), log=lambda _: None
    )
    return replace(verification, latents=latents)


def _write_int8(
    staging: Path,
    checkpoint: Checkpoint,
    fp32_encoder: GraphEntry,
    options: ExportOptions,
    own_data: Callable[[], TrainingData],
    log: Callable[[str], None],
) -> GraphEntry:
    """The INT8 encoder, calibrated on `options.calibration` (default: the checkpoint's own data) and checked
    against PyTorch's codes on held-out crops of the checkpoint's data. An imported model's data is not here, and
    it takes whole images at its size: it is calibrated and checked on at most `options.calibration_count` images of
    the calibration folder, each resized and cut at the centre as it is fed, or by default on the embedded
    photographs."""
    calibration, count, max_pixels = options.calibration, options.calibration_count, options.max_pixels
    if not checkpoint.model.trained_by_vqtool:
        size = checkpoint.model_config.image_size
        if calibration is None:
            photos, source = embedded_photographs(size), "the embedded photographs"
        else:
            from vqtool.data.whole import read_image_set

            photos, source = read_image_set(calibration, size, fit=Fit(CENTER, max_pixels))[0], str(calibration)
        photos = photos[:count]
        log(f"calibrating INT8 ranges on {len(photos)} images from {source}, at {size}x{size}")
        checked = photos[: -(-AGREEMENT_CODES // checkpoint.model_config.grid**2)]
        judge = bounded_judge(checkpoint.model, checked, fp32_encoder.activation_bytes, options.min_identical)
        return write_checked_int8_encoder(
            staging, fp32_encoder, photos, judge, log, f"{len(checked)} of the same images"
        )
    data: TrainingData
    if calibration is not None:
        from vqtool.train.data.streaming import load_training_set

        size = checkpoint.model_config.image_size
        data, source = load_training_set(calibration, size, max_pixels=max_pixels), str(calibration)
    else:
        data, source = own_data(), checkpoint.data or "the embedded default data"
    images = calibration_images(data, count, source, log)
    held_out = data.batch(0, AGREEMENT_IMAGES, seed=AGREEMENT_SEED)
    judge = bounded_judge(checkpoint.model, held_out, fp32_encoder.activation_bytes, options.min_identical)
    return write_checked_int8_encoder(staging, fp32_encoder, images, judge, log)


def _write_manifest(
    staging: Path,
    checkpoint: Checkpoint,
    checkpoint_sha: str,
    graphs: dict[str, GraphEntry],
    latent_decode: str = "",
    latent_channels: int = 0,
) -> Manifest:
    """The slim PyTorch checkpoint that travels with the graphs (parity and --backend torch need no other file),
    and manifest.json over everything written."""
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
        graphs=graphs,
        vqtool_version=vqtool.__version__,
        torch_version=str(torch.__version__),
        pytorch_file=PYTORCH_FILE,
        pytorch_sha256=sha256_file(staging / PYTORCH_FILE),
        latent_decode=latent_decode,
        latent_channels=latent_channels,
    )
    write_json(staging / MANIFEST_NAME, manifest.to_dict())
    return manifest


def _check_options(int8: bool, calibration_count: int, trt: bool, latent_decode: str | None) -> None:
    if trt:
        from vqtool.runtime.tensorrt import require_tensorrt_gpu

        require_tensorrt_gpu()  # before any work: a missing TensorRT or GPU is one sentence, not a half export
    if int8 and calibration_count < 1:
        raise VqtoolError(f"--calibration-images must be at least 1, got {calibration_count}")
    if latent_decode is not None and latent_decode not in LATENT_DECODES:
        raise VqtoolError(f"--latent-decode takes {' or '.join(LATENT_DECODES)}, got {latent_decode!r}")


def _fail_parity(staging: Path, out_dir: Path, verification: Verification) -> ParityFailed:
    """Keep the graphs whose FP32 failed parity beside the target for inspection; the error that says where. An earlier
    failed export kept there is replaced in what it holds of its own; a folder of that name that is not one stays,
    and the graphs go beside it under a numbered name."""
    kept = out_dir.with_name(f"{out_dir.name}.failed-parity")
    number = 1
    while kept.exists() and not remove_export(kept):
        number += 1
        kept = out_dir.with_name(f"{out_dir.name}.failed-parity-{number}")
    staging.rename(kept)
    reasons = [
        f"{r.runtime} {r.precision} meets no contract: {', '.join(r.failures)}"
        for r in verification.reports
        if not r.passed
    ] + [
        f"{r.runtime} {r.precision} latent graphs: {', '.join(r.failures)}"
        for r in verification.latents
        if not r.passed and r.precision == FP32
    ]
    return ParityFailed(f"parity failed ({'; '.join(reasons)}); graphs kept for inspection in {kept}", verification)


@dataclass(frozen=True)
class ExportOptions:
    """What `vqtool export` writes besides the FP32 graphs, and how: the command's options as one value."""

    fp16: bool = False  # FP16 graphs, with the quantizer FP32
    bf16: bool = False  # OpenVINO's BF16 over the FP32 graphs, checked (no file of its own)
    int8: bool = False  # an INT8 encoder for CPUs, calibrated on `calibration` (default: the checkpoint's own data)
    calibration: Path | None = None
    calibration_count: int = CALIBRATION_IMAGES
    max_pixels: int = DEFAULT_MAX_PIXELS  # image files read for calibration or parity
    trt: bool = False  # TensorRT engines, built for `profile`'s batches
    profile: EngineProfile = EngineProfile()
    timing_cache: Path | None = None
    images: Path | None = None  # the images parity compares on (default: the held-out data)
    overwrite: bool = False  # over an earlier export, replacing only what its manifest lists
    min_identical: float = 0.0  # the share of identical codes the bounded contract asks for
    latents: bool = False  # the latent graphs too, at each graph precision written (FP32, and FP16 with fp16)
    latent_decode: str | None = None  # QUANTIZE or DIRECT; None: as the model's pipeline decodes


def export_model(
    checkpoint_path: Path,
    out_dir: Path,
    options: ExportOptions | None = None,
    *,
    parity_images: np.ndarray | None = None,
    log: Callable[[str], None] = print,
    **keywords: Any,
) -> ExportResult:
    """Write graphs (+ engines), manifest and parity.json to `out_dir`; FP32 failing its exact parity fails the
    export, while a reduced precision that meets no contract is refused (`verification.refused`, recorded in
    parity.json, and no runtime starts it) and the rest is published.

    `options` (an ExportOptions, or its fields as keywords) say what to write besides the FP32 graphs. Parity
    compares on `options.images` (a collection, read at the model's size), or `parity_images` (an array), or by
    default on the held-out data the checkpoint was trained on (an imported model: the embedded photographs).
    `out_dir` must not exist, be empty, or (with `overwrite`) hold an earlier export, of which only the files its
    manifest lists are replaced; no other run may write it meanwhile."""
    if options is not None and keywords:
        raise TypeError("export_model takes an ExportOptions or its keywords, not both")
    options = options or ExportOptions(**keywords)
    _check_options(options.int8, options.calibration_count, options.trt, options.latent_decode)
    if options.bf16:
        refuse_bf16_that_nothing_runs()
    with output_lock(out_dir):
        check_export_target(out_dir, overwrite=options.overwrite)
        checkpoint = load_for_export(checkpoint_path)
        if options.images is not None:  # before any work: a folder that cannot be read stops the export in one line
            from vqtool.data.whole import read_image_set

            size = checkpoint.model_config.image_size
            parity_images = read_image_set(options.images, size, fit=Fit(max_pixels=options.max_pixels))[0]
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
        usual_mode(staging)
        try:
            manifest, verification = _write_export(
                staging, checkpoint, sha256_file(checkpoint_path), options, parity_images, log
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not verification.exact_held:
            raise _fail_parity(staging, out_dir, verification)
        try:
            replace_export(staging, out_dir)
        except VqtoolError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ExportResult(out_dir, manifest, verification)


def _write_export(
    staging: Path,
    checkpoint: Checkpoint,
    checkpoint_sha: str,
    options: ExportOptions,
    parity_images: np.ndarray | None,
    log: Callable[[str], None],
) -> tuple[Manifest, Verification]:
    """Every file of the export, written into `staging`, and parity over them."""
    entries: dict[str, GraphEntry] = {}
    latent_decode = (options.latent_decode or checkpoint.model.pipeline_latent_decode) if options.latents else ""
    if latent_decode:
        refuse_latents_without_decoder(checkpoint.model)  # before any graph is exported
    if latent_decode == QUANTIZE and getattr(checkpoint.model_config, "used_codes", None) is not None:
        # The library quantises latents to the nearest of all rows, code ids to rows in use: not one codebook.
        raise VqtoolError(
            "--latents: this model remaps its codes to the codebook rows in use (taming's remap), and its pipeline "
            "would quantise latents to rows outside them; use --latent-decode direct"
        )
    latent_channels = 0
    for precision in (FP32, FP16) if options.fp16 else (FP32,):
        entries.update(write_graphs(checkpoint.model, checkpoint_sha, staging, precision))
        if latent_decode:
            how = "through their nearest codes" if latent_decode == QUANTIZE else "as they are"
            log(f"latent graphs ({precision}): latents decoded {how}")
            latent_entries, latent_channels = write_latent_graphs(
                checkpoint.model, checkpoint_sha, staging, precision, latent_decode
            )
            entries.update(latent_entries)
    _check_trt_compatible(staging, entries, strict=options.trt, log=log)
    # The checkpoint's own data is read (and its skipped files reported) once, for calibration and parity.
    own_data = functools.cache(lambda: training_set_of(checkpoint, log))
    graphs = dict(entries)
    if options.int8:
        # After the TensorRT check: the INT8 graph is for the CPU runtimes, not TensorRT.
        fp32_encoder = entries[graph_key("encoder", FP32)]
        graphs[graph_key("encoder", INT8)] = _write_int8(staging, checkpoint, fp32_encoder, options, own_data, log)
    manifest = _write_manifest(staging, checkpoint, checkpoint_sha, graphs, latent_decode, latent_channels)
    if options.trt:
        coded = {key: entry for key, entry in entries.items() if key.split(".")[0] in ROLES}  # no engines for latents
        _build_engines(staging, coded, checkpoint.model_config, options.profile, options.timing_cache, log)
    compared = parity_images if parity_images is not None else default_parity_images(checkpoint, own_data)
    # BF16 has no graph of its own: with --bf16, PyTorch's autocast is checked here and OpenVINO's below.
    written = tuple(p for p in PRECISIONS if p != BF16 or options.bf16)
    verification = verify_export(
        checkpoint.model,
        staging,
        manifest,
        compared,
        backends=EXPORT_RUNTIMES,
        precisions=written,
        min_identical=options.min_identical,
        log=log,
    )
    if options.bf16:
        log("parity: openvino on CPU (bf16), in a process of its own")
        verification = verification.joined(_bf16_parity(staging, compared, options.min_identical))
        if not any(report.precision == BF16 for report in verification.reports):
            bf16_skipped = [why for why in verification.skipped if f"({BF16})" in why]
            raise _bf16_refused(bf16_skipped)
    if latent_decode:
        latents = verify_latents(
            checkpoint.model, staging, manifest, compared, backends=EXPORT_RUNTIMES, precisions=written, log=log
        )
        verification = replace(verification, latents=latents + verification.latents)
        manifest = _drop_refused_latents(staging, manifest, latents, log)
    write_json(staging / PARITY_NAME, verification.to_dict())
    return manifest, verification


def _drop_refused_latents(
    staging: Path, manifest: Manifest, reports: tuple[LatentReport, ...], log: Callable[[str], None]
) -> Manifest:
    """Leave out each reduced-precision latent graph that misses its rule (FP32's missing it fails the export): what
    no runtime may start is not published. A precision without graphs of its own (BF16) has nothing to leave out:
    parity.json's record keeps it from starting."""
    graphs = dict(manifest.graphs)
    for report in reports:
        for role in LATENT_ROLES:
            key = graph_key(role, report.precision)
            # FP32's graph is never left out: BF16 runs it too, and FP32 missing its rule fails the export.
            if not report.failures_of(role) or key == graph_key(role, FP32) or key not in graphs:
                continue
            log(f"refused: {key} ({'; '.join(report.failures_of(role))}); left out of the export")
            (staging / graphs.pop(key).file).unlink()
    if graphs == manifest.graphs:
        return manifest
    kept = replace(manifest, graphs=graphs)
    write_json(staging / MANIFEST_NAME, kept.to_dict())
    return kept
