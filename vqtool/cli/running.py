"""`vqtool encode`, `decode`, `merge` and `bench`: thin layers over the Python API (vqtool.api) and the
library functions behind it. None of them needs PyTorch but bench, whose baseline is PyTorch eager."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vqtool.cli.common import (
    Crop,
    CropOption,
    DeviceOption,
    MaxPixelsOption,
    OverwriteOption,
    RunPrecision,
    SkipBadOption,
    app,
    out,
    pixel_limit,
    print_result,
    require_torch,
    say,
    user_errors,
)
from vqtool.errors import VqtoolError
from vqtool.images.limits import DEFAULT_MAX_PIXELS
from vqtool.runtime.base import Backend, CheckedBackend, Device

if TYPE_CHECKING:
    from vqtool.pipeline.encode import EncodeResult

BackendOption = Annotated[
    Backend,
    typer.Option(help="auto takes the fastest that starts here: tensorrt, then ONNX Runtime on CUDA, then on the CPU."),
]
PrecisionOption = Annotated[
    RunPrecision,
    typer.Option(
        help="fp32; fp16 (needs export --fp16); bf16 (OpenVINO, or --backend torch under autocast); "
        "int8, encode on CPU only (needs export --int8); "
        "fastest: the fastest that parity.json publishes under the exact or bounded contract, by bench.json. "
        "The codes' sidecar records the contract they were made under."
    ),
]


ReadersOption = Annotated[
    int | None,
    typer.Option(help="Processes that read image files, at low priority (default: one per core, at most 16)."),
]


class Engine(str, enum.Enum):
    """Where encode runs: this machine's reader processes, or Ray Data."""

    local = "local"
    ray = "ray"


ThreadsOption = Annotated[int | None, typer.Option(help="CPU threads for inference (default: one per core).")]
EnginesOption = Annotated[
    bool,
    typer.Option(
        "--engines/--no-engines",
        help="Whether TensorRT engine files in the export may run (an engine is code TensorRT runs, not data: "
        "--no-engines for exports you did not build).",
    ),
]


@app.command()
@user_errors
def encode(
    images: Annotated[
        list[str],
        typer.Argument(
            help="Image files and folders (searched recursively), .txt lists of paths, WebDataset tar shards (a .tar, "
            "a folder of them or a brace pattern) and Parquet files with an image-bytes column.",
            show_default=False,
        ),
    ],
    model: Annotated[Path, typer.Option(help="Export folder made by vqtool export.")],
    out_path: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Output: codes.npy (N x h x w) with a codes.json sidecar, or codes.parquet (one row per image: key, "
            "codes, height, width; the sidecar in its metadata).",
        ),
    ],
    batch_size: Annotated[int, typer.Option(help="Images per inference batch.")] = 64,
    resize: Annotated[
        bool,
        typer.Option(
            help="Resize images to the model's size; --no-resize keeps sizes that are multiples of the model's "
            "downsampling factor (16 for the default model)."
        ),
    ] = True,
    backend: BackendOption = Backend.auto,
    device: DeviceOption = Device.auto,
    precision: PrecisionOption = RunPrecision.fp32,
    shard: Annotated[
        str | None,
        typer.Option(help="Encode only slice I of N (I/N, I from 0) of the sorted file list; join with vqtool merge."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same command.")] = False,
    overwrite: OverwriteOption = False,
    engines: EnginesOption = True,
    readers: ReadersOption = None,
    threads: ThreadsOption = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    skip_bad: SkipBadOption = False,
    crop: CropOption = Crop.resize,
    image_column: Annotated[
        str | None,
        typer.Option(help="Parquet inputs: the column of image bytes (default: image, jpg, jpeg, png or webp)."),
    ] = None,
    key_column: Annotated[
        str | None, typer.Option(help="Parquet inputs: the column that names each row (default: key, else file#row).")
    ] = None,
    engine: Annotated[
        Engine,
        typer.Option(help="local: this machine's processes; ray: Ray Data tasks and tokenizer actors."),
    ] = Engine.local,
    ray_address: Annotated[
        str | None,
        typer.Option(help="--engine ray: join this Ray cluster (auto, ray://head:10001, ...); default: start one."),
    ] = None,
) -> None:
    """Encode images to integer codes with the exported encoder."""
    import signal

    from vqtool.api import load
    from vqtool.pipeline.encode import EncodeOptions, interrupt_on_sigterm
    from vqtool.runtime.select import RuntimeChoice

    options = EncodeOptions.of(
        batch_size=batch_size,
        resize=resize,
        crop=crop.value,
        max_pixels=pixel_limit(max_pixels),
        shard=shard,
        skip_bad=skip_bad,
        readers=readers,
        resume=resume,
        overwrite=overwrite,
        image_column=image_column,
        key_column=key_column,
    )
    runtime = RuntimeChoice(backend, device, precision, threads, engines)
    if engine is Engine.ray:
        from vqtool.ray.engine import encode_on_ray

        _print_encoded(encode_on_ray(images, out_path, model, options, runtime, address=ray_address, log=say))
        return
    if ray_address is not None:
        raise VqtoolError("--ray-address is for --engine ray")
    tok = load(model, runtime=runtime, lazy=True)
    tok.start("encoder")  # the one graph encode runs: a backend that cannot start says so before any file is read
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    _print_encoded(tok.encode_files(images, out_path, options, log=say))


def _print_encoded(result: EncodeResult) -> None:
    beside = "" if result.sidecar_path == result.codes_path else f" and {result.sidecar_path}"
    print_result(
        f"wrote {result.codes_path} ({result.count} x {result.grid[0]} x {result.grid[1]} codes){beside} "
        f"in {result.seconds:.2f}s ({result.count / result.seconds:.0f} images/s)"
        + (f", under the {result.contract.describe()}" if result.contract is not None else "")
    )


@app.command()
@user_errors
def merge(
    shards: Annotated[list[Path], typer.Argument(help="Shard outputs of vqtool encode --shard I/N (any order).")],
    out_path: Annotated[Path, typer.Option("--out", help="Merged codes .npy (its sidecar is written beside it).")],
    overwrite: OverwriteOption = False,
) -> None:
    """Join shard outputs into one codes.npy + sidecar, identical to a single pass."""
    from vqtool.pipeline.shards import merge_shards

    merged = merge_shards(shards, out_path, overwrite=overwrite)
    print_result(f"merged {len(shards)} shards into {out_path} ({len(merged.files)} images)")


@app.command()
@user_errors
def decode(
    codes: Annotated[Path, typer.Argument(help="codes.npy or codes.parquet written by vqtool encode.")],
    model: Annotated[Path, typer.Option(help="Export folder made by vqtool export.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the PNG reconstructions.")],
    batch_size: Annotated[int, typer.Option(help="Code grids per inference batch.")] = 64,
    backend: BackendOption = Backend.auto,
    device: DeviceOption = Device.auto,
    precision: PrecisionOption = RunPrecision.fp32,
    writers: Annotated[
        int | None,
        typer.Option(help="Processes that write PNG files, at low priority (default: one per 2 cores, at most 16)."),
    ] = None,
    threads: ThreadsOption = None,
    overwrite: OverwriteOption = False,
    engines: EnginesOption = True,
    max_pixels: Annotated[
        int,
        typer.Option(
            help="Refuse code grids whose images would have more pixels than this (default: Pillow's warning "
            "threshold, as encode's --max-pixels).",
        ),
    ] = DEFAULT_MAX_PIXELS,
) -> None:
    """Decode integer codes back to images (one PNG per code grid)."""
    from vqtool.api import load
    from vqtool.runtime.select import RuntimeChoice

    tok = load(model, runtime=RuntimeChoice(backend, device, precision, threads, engines), lazy=True)
    tok.start("decoder")
    result = tok.decode_file(
        codes,
        out_dir,
        batch_size=batch_size,
        writers=writers,
        log=say,
        overwrite=overwrite,
        max_pixels=pixel_limit(max_pixels),
    )
    print_result(f"wrote {result.count} PNG files to {result.out_dir} in {result.seconds:.2f}s")


@app.command()
@user_errors
def bench(
    export_dir: Annotated[Path, typer.Argument(help="Export folder made by vqtool export.")],
    images: Annotated[
        Path | None, typer.Option(help="Folder of image files for the end-to-end encode benchmark.")
    ] = None,
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes (repeatable; default 1, 32, 256).")] = None,
    backend: Annotated[
        list[CheckedBackend] | None,
        typer.Option(help="Limit to these backends (repeatable); PyTorch eager always runs as the baseline."),
    ] = None,
    seconds: Annotated[float, typer.Option(help="Minimum timed seconds per measurement.")] = 1.0,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Where to write bench.json (default: EXPORT_DIR/bench.json).")
    ] = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
) -> None:
    """Benchmark encode/decode per backend against PyTorch eager; with --images, a folder end to end."""
    require_torch("bench")
    from vqtool.bench.model_only import BATCH_SIZES
    from vqtool.bench.report import run_bench

    _, target = run_bench(
        export_dir,
        images=images,
        batch_sizes=tuple(batch) if batch else BATCH_SIZES,
        backends=tuple(b.value for b in backend) if backend else None,
        seconds=seconds,
        max_pixels=pixel_limit(max_pixels),
        out=out_path,
        log=say,
        show=_show_bench_part,
    )
    print_result(f"wrote {target}")


def _show_bench_part(part: str, rows: list[dict[str, Any]]) -> None:
    from vqtool.cli.tables import bench_table, folder_table

    out.print(bench_table(rows) if part == "model_only" else folder_table(rows))
