"""`vqtool export` and `vqtool parity`: graphs written and checked against the PyTorch model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias

import typer

from vqtool.cli.common import (
    Crop,
    CropOption,
    MaxPixelsOption,
    OverwriteOption,
    app,
    choices,
    out,
    pixel_limit,
    print_result,
    require_torch,
    say,
    user_errors,
)
from vqtool.errors import VqtoolError
from vqtool.formats.manifest import LATENT_DECODES
from vqtool.images.limits import DEFAULT_MAX_PIXELS
from vqtool.precisions import FP32, NO_CONTRACT, Precision
from vqtool.runtime.base import CheckedBackend

if TYPE_CHECKING:  # a choice type is Any to mypy (vqtool.cli.common says why)
    LatentDecode: TypeAlias = Any
else:
    LatentDecode = choices("LatentDecode", LATENT_DECODES)  # vqtool.formats.manifest: how decoder_latents decodes
MinIdenticalOption = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        help="The share of codes that must equal PyTorch's for a reduced precision to be published under the "
        "bounded contract (its other limits: docs, Choosing a precision).",
    ),
]


def _decibels(value: float | None) -> str:
    return "identical" if value is None else f"{value:.1f} dB"


def _show_verification(verification: dict[str, Any]) -> None:
    from vqtool.cli.tables import drift_table, parity_table

    reports = verification["reports"]
    naive = verification.get("naive_fp16_for_comparison")
    naive_bf16 = verification.get("naive_bf16_for_comparison")
    shown = reports + [r for r in (naive, naive_bf16) if r]
    out.print(parity_table(shown))
    out.print(drift_table(shown))
    if naive:
        say("fp16-naive is shown for comparison only (all FP16, quantizer included); it is not exported")
    if naive_bf16:
        say("bf16-naive is shown for comparison only (OpenVINO BF16 over whole graphs); bf16 keeps the quantizer FP32")
    for r in reports:
        if r.get("contract") == "bounded":
            say(
                f"{r['runtime']} {r['precision']}: published under the bounded contract: {r['identical_fraction']:.2%} "
                f"of codes identical; a changed code's regret is {r['regret_p99']:.3g} at p99, its rank at most "
                f"{r['rank_max']}, and its decode {_decibels(r['drift_psnr'])} from the exact codes'"
                + (
                    f"; against the input images, {r['quality_change_db']:+.2f} dB"
                    if r.get("quality_change_db") is not None
                    else ""
                )
                + (f" (measured on {r['cpu']})" if r.get("cpu") else "")
            )
        elif r.get("contract") == NO_CONTRACT and r["precision"] != FP32:
            say(
                f"{r['runtime']} {r['precision']}: refused, it meets no contract ({'; '.join(r['failures'])}); "
                "no runtime will start it"
            )
    for r in verification.get("latents", []):
        verdicts = [
            f"{side}_latents " + (f"refused ({'; '.join(failures)})" if failures else "meets its rule")
            for side in ("encoder", "decoder")
            for failures in [r[f"{side}_failures"]]
        ]
        say(
            f"{r['runtime']} {r['precision']} latent graphs: {', '.join(verdicts)}; latents within "
            f"{r['latent_error']:.2g} of their range from PyTorch's, decoded {_decibels(r['decode_psnr'])} from "
            f"PyTorch's decode ({r['decode']})"
        )
    for reason in verification["skipped"]:
        say(f"not checked: {reason}")


@app.command("export")
@user_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint.pt written by vqtool train.")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Export folder (default: CHECKPOINT's folder/export).")
    ] = None,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="Also write FP16 graphs: FP16 convolutions, FP32 quantizer.")
    ] = False,
    bf16: Annotated[
        bool,
        typer.Option(
            "--bf16",
            help="Also check BF16 on this CPU (OpenVINO over the FP32 graphs, PyTorch under autocast; the quantizer "
            "in FP32 in both) and publish each under the contract it meets.",
        ),
    ] = False,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Also write an INT8 encoder for CPUs (ONNX Runtime and OpenVINO; fastest with 8-bit dot-product "
            "instructions, VNNI or AMX). "
            "Its codes differ from PyTorch's: it is published under the bounded contract where it meets it.",
        ),
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Images to calibrate INT8 ranges on: a folder, .npy/.npz or CIFAR folder (default: the data the "
            "checkpoint was trained on; for an imported model, the embedded photographs). An imported model "
            "calibrates on whole images at its size, resized and cut at the centre."
        ),
    ] = None,
    calibration_images: Annotated[
        int,
        typer.Option(
            help="How many images to calibrate on: crops of the model's size (an imported model: whole images, "
            "at most this many)."
        ),
    ] = 2048,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Images to check parity on: a folder, .npy/.npz or CIFAR folder (default: the validation split of "
            "the training data; for an imported model, the embedded photographs at its size)."
        ),
    ] = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    trt: Annotated[
        bool, typer.Option("--trt", help="Also build TensorRT engines (needs TensorRT >= 10 and a GPU).")
    ] = False,
    batch_min: Annotated[int, typer.Option(help="TensorRT profile: smallest batch.")] = 1,
    batch_opt: Annotated[int, typer.Option(help="TensorRT profile: batch to tune for.")] = 64,
    batch_max: Annotated[int, typer.Option(help="TensorRT profile: largest batch.")] = 256,
    workspace: Annotated[int, typer.Option(help="TensorRT builder workspace in MiB.")] = 1024,
    timing_cache: Annotated[
        Path | None,
        typer.Option(
            help="TensorRT timing cache file, reused across builds (default: one per TensorRT version and GPU "
            "under ~/.cache/vqtool/)."
        ),
    ] = None,
    min_identical: MinIdenticalOption = 0.0,
    latents: Annotated[
        bool,
        typer.Option(
            "--latents",
            help="Also write encoder_latents.onnx (images -> the latents before quantisation, as the library's "
            "encode(x).latents) and decoder_latents.onnx (latents -> images), for diffusion pipelines that hand "
            "latents rather than codes; checked against the library's own code.",
        ),
    ] = False,
    latent_decode: Annotated[
        LatentDecode | None,
        typer.Option(
            help="How decoder_latents.onnx decodes: quantize (through the nearest codes, as latent diffusion's "
            "vqvae.decode) or direct (as they are, as Kandinsky's movq.decode(force_not_quantize=True)); default: "
            "as the model's pipeline decodes (direct for spatial-norm models such as MoVQ)."
        ),
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Export encoder/decoder ONNX graphs (and TensorRT engines), and verify parity against PyTorch."""
    if trt:  # before torch is even imported: a missing TensorRT or GPU costs the user nothing
        from vqtool.runtime.tensorrt import require_tensorrt_gpu

        require_tensorrt_gpu()
    require_torch("export")
    from vqtool.export.pipeline import ExportOptions, ParityFailed, export_model
    from vqtool.export.tensorrt import EngineProfile
    from vqtool.formats.manifest import PARITY_NAME

    target = out_dir or checkpoint.parent / "export"
    profile = EngineProfile(batch_min, batch_opt, batch_max, workspace)
    try:
        options = ExportOptions(
            fp16=fp16,
            bf16=bf16,
            int8=int8,
            calibration=calibration,
            calibration_count=calibration_images,
            max_pixels=pixel_limit(max_pixels),
            trt=trt,
            profile=profile,
            timing_cache=timing_cache,
            images=images,
            overwrite=overwrite,
            min_identical=min_identical,
            latents=latents or latent_decode is not None,
            latent_decode=latent_decode.value if latent_decode is not None else None,
        )
        result = export_model(checkpoint, target, options, log=say)
    except ParityFailed as failed:
        _show_verification(failed.verification.to_dict())
        raise
    _show_verification(result.verification.to_dict())
    files = sorted(p.name for p in target.iterdir() if p.suffix in (".onnx", ".engine"))
    refused = "".join(f"; refused: {r.runtime} {r.precision}" for r in result.verification.refused)
    print_result(f"exported {', '.join(files)}, manifest.json and {PARITY_NAME} to {target}{refused}")


@app.command()
@user_errors
def parity(
    export_dir: Annotated[Path, typer.Argument(help="Export folder made by vqtool export.")],
    images: Annotated[
        Path | None,
        typer.Option(
            help="Images to compare on: a folder, .npy/.npz or CIFAR folder "
            "(default: the validation split of the training data)."
        ),
    ] = None,
    backend: Annotated[
        list[CheckedBackend] | None,
        typer.Option(help="Limit to these backends (repeatable). Default: every one that starts here."),
    ] = None,
    naive_fp16: Annotated[
        bool,
        typer.Option(help="Also measure an all-FP16 graph (quantizer in FP16 too), to show what the FP32 island buys."),
    ] = False,
    precision: Annotated[
        list[Precision] | None,
        typer.Option(help="Limit to these precisions (repeatable). Default: every one the export and runtimes offer."),
    ] = None,
    naive_bf16: Annotated[
        bool,
        typer.Option(help="Also measure OpenVINO BF16 over the whole graphs, to show what the FP32 island buys."),
    ] = False,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    crop: CropOption = Crop.resize,
    min_identical: MinIdenticalOption = 0.0,
) -> None:
    """Compare the PyTorch model with every available backend and precision; writes parity.json."""
    require_torch("parity")
    from vqtool.export.parity import check_export
    from vqtool.formats.manifest import PARITY_NAME
    from vqtool.precisions import PRECISIONS

    verification = check_export(
        export_dir,
        images=images,
        backends=tuple(b.value for b in backend) if backend else None,
        naive_fp16=naive_fp16,
        naive_bf16=naive_bf16,
        precisions=tuple(p.value for p in precision) if precision else PRECISIONS,
        max_pixels=pixel_limit(max_pixels),
        crop=crop.value,
        min_identical=min_identical,
        log=say,
    )
    _show_verification(verification.to_dict())
    if not verification.reports:
        raise VqtoolError("no backend could run here, so nothing was compared")
    if not verification.passed:
        failed = [f"{r.runtime} {r.precision} ({r.first_failure})" for r in verification.reports if not r.passed]
        failed += [f"{r.runtime} {r.precision} latents ({r.failures[0]})" for r in verification.latents if not r.passed]
        raise VqtoolError(f"parity failed for {'; '.join(failed)}; details in {export_dir / PARITY_NAME}")
    print_result(f"parity passed for {len(verification.reports)} runtime(s); wrote {export_dir / PARITY_NAME}")
