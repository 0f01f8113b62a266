"""The `vqtool` command line: thin Typer commands over library functions.

Nothing here imports torch at module level: encode/decode run where PyTorch is not installed,
and train/export reach the `train` and `export` packages inside the commands that need them.
"""

from __future__ import annotations

import enum
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from vqtool.errors import VqtoolError, missing_extra
from vqtool.limits import DEFAULT_MAX_PIXELS

app = typer.Typer(
    help="Train a VQ-VAE image tokenizer, export it to ONNX (and TensorRT), and run it with verified parity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output gets a width that fits the parity table rather than rich's default of 80 columns.
# Messages are never wrapped, so scripts can grep them; tables still fit the width.
out = Console(width=None if sys.stdout.isatty() else 132, soft_wrap=True)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 132, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def _say(message: str) -> None:
    err.print(escape(message), highlight=False)


def _result(message: str) -> None:
    """A command's result on stdout, printed as is (paths may contain [brackets])."""
    out.print(message, highlight=False, markup=False)


def user_errors(command: F) -> F:
    """Print a VqtoolError as one line on stderr and exit 1, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except VqtoolError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _require_torch(command: str) -> None:
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        raise missing_extra(f"vqtool {command}", "PyTorch", "train") from None


def next_run_dir(root: Path) -> Path:
    """runs/run-001, runs/run-002, ...: a new run never lands on an old one."""
    taken = {p.name for p in root.glob("run-*")} if root.is_dir() else set()
    number = 1
    while f"run-{number:03d}" in taken:
        number += 1
    return root / f"run-{number:03d}"


DataOption = Annotated[
    Path | None,
    typer.Option(
        help="Folder of images (recursive), a .txt list of image paths (relative to the list's folder), tar "
        "shards (a folder of .tar files, or a brace pattern such as 'shards/train-{000000..000099}.tar'), a .npy "
        "(read by row) or .npz uint8 N x H x W x 3 array, or a cifar-10-batches-py folder; read while training "
        "runs. Default: the embedded photographs.",
        show_default=False,
    ),
]
ValDataOption = Annotated[
    Path | None,
    typer.Option(
        help="A separate validation collection (any --data form; centre crops, at most 2,000 images). Default: a "
        "fixed held-out part of --data (10%, at most 2,000 images; for tar shards, the last shard).",
        show_default=False,
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        help="Processes that read and decode training images (default: one per four cores, so none on 2 cores; "
        "0 reads in the training process). Batches do not depend on it, except from tar shards.",
        show_default=False,
    ),
]
EpochsOption = Annotated[int | None, typer.Option(help="Epochs to train (default 10; ignored with --steps).")]
StepsOption = Annotated[int | None, typer.Option(help="Total optimisation steps (overrides --epochs).")]
StepsPerEpochOption = Annotated[
    int | None, typer.Option(help="Steps per epoch (default: one pass over the data; 128 on the default data).")
]
BatchOption = Annotated[int, typer.Option(help="Images per step (the global batch under torchrun).")]
EmaOption = Annotated[
    bool | None,
    typer.Option("--ema", is_flag=True, help="Update the codebook by exponential moving averages.", show_default=False),
]
EmaDecayOption = Annotated[float, typer.Option(help="Decay of the --ema averages.")]
KmeansOption = Annotated[
    bool | None,
    typer.Option(
        "--kmeans-init",
        is_flag=True,
        help="Initialise the codebook by k-means on the first batches' encoder outputs.",
        show_default=False,
    ),
]


class Preset(str, enum.Enum):
    """What `--preset` accepts (vqtool.train.config.PRESETS holds what each sets)."""

    seed = "seed"
    f8 = "f8"
    f4 = "f4"


PresetOption = Annotated[
    Preset,
    typer.Option(
        help="seed: the article's model (4 tokens per 32x32 image); f8 / f4: the best factor-8 / factor-4 "
        "tokenizers measured (README, The model family). Options given explicitly override the preset."
    ),
]
DownsampleOption = Annotated[
    int | None, typer.Option(help="Image side / code-grid side: 16 (default), 8, 4 or 2.", show_default=False)
]
ChannelsOption = Annotated[
    str | None,
    typer.Option(
        help="Encoder widths, comma-separated, mirrored by the decoder (default 32,64,128).",
        show_default=False,
    ),
]
ResBlocksOption = Annotated[
    int | None,
    typer.Option(
        help="Residual blocks at the latent resolution, in encoder and decoder (default 0).",
        show_default=False,
    ),
]
LookupDimOption = Annotated[
    int | None,
    typer.Option(
        help="Look codes up in a d-dimensional projection of the latent (factorized codes).",
        show_default=False,
    ),
]
L2CodesOption = Annotated[
    bool | None,
    typer.Option(
        "--l2-codes",
        is_flag=True,
        help="l2-normalise latents and codes before the distance (cosine similarity).",
        show_default=False,
    ),
]


class LrSchedule(str, enum.Enum):
    """What `--lr-schedule` accepts."""

    constant = "constant"
    cosine = "cosine"


LrScheduleOption = Annotated[
    LrSchedule | None,
    typer.Option(
        help="constant (the article's; default) or cosine: decay the rate to 0 over the run.", show_default=False
    ),
]
WarmupOption = Annotated[
    int | None, typer.Option(help="Raise the rate linearly over this many first steps (default 0).", show_default=False)
]
RestartOption = Annotated[
    int | None, typer.Option(help="Re-seed codes unused for this many steps from recent encoder outputs.")
]


MaxPixelsOption = Annotated[
    int,
    typer.Option(
        help="Refuse image files whose header declares more pixels than this, before decoding them "
        "(decompression bombs). Default: Pillow's warning threshold."
    ),
]
SkipBadOption = Annotated[
    bool,
    typer.Option(
        "--skip-bad",
        help="Skip files that cannot be read (or exceed --max-pixels), report them, and go on; "
        "without it the first such file stops the run.",
    ),
]


def _pixel_limit(max_pixels: int) -> int:
    from vqtool.images import allow_pixels

    allow_pixels(max_pixels)
    return max_pixels


def _load_training_set(
    source: Path | None, image_size: int, max_pixels: int, skip_bad: bool, val_data: str | None = None
) -> Any:
    from vqtool.train.sources import collection_exists, load_training_set

    for path in (source, val_data):
        if path is not None and not collection_exists(path):
            raise VqtoolError("no such file or folder", path)
    try:
        return load_training_set(
            source, image_size, max_pixels=_pixel_limit(max_pixels), skip_bad=skip_bad, val_data=val_data, log=_say
        )
    except RuntimeError as exc:  # the default data's missing scikit-image
        raise VqtoolError(str(exc)) from None


@app.command()
@user_errors
def train(
    data: DataOption = None,
    val_data: ValDataOption = None,
    workers: WorkersOption = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (default: a new runs/run-NNN).")] = None,
    preset: PresetOption = Preset.seed,
    codes: Annotated[int | None, typer.Option(help="Codebook size K (default 256, or the preset's).")] = None,
    dim: Annotated[int | None, typer.Option(help="Latent dimension D (default 256, or the preset's).")] = None,
    image_size: Annotated[int, typer.Option(help="Training image side, a multiple of --downsample.")] = 32,
    downsample: DownsampleOption = None,
    channels: ChannelsOption = None,
    res_blocks: ResBlocksOption = None,
    lookup_dim: LookupDimOption = None,
    l2_codes: L2CodesOption = None,
    epochs: EpochsOption = None,
    steps: StepsOption = None,
    batch_size: BatchOption = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    lr_schedule: LrScheduleOption = None,
    warmup_steps: WarmupOption = None,
    beta: Annotated[float, typer.Option(help="Commitment loss weight β.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory from its checkpoint.")] = None,
    ema: EmaOption = None,
    ema_decay: EmaDecayOption = 0.99,
    kmeans_init: KmeansOption = None,
    restart_dead: RestartOption = None,
    steps_per_epoch: StepsPerEpochOption = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    skip_bad: SkipBadOption = False,
) -> None:
    """Train the VQ-VAE; writes checkpoint.pt, metrics.jsonl and figures/ to the run directory."""
    _require_torch("train")
    from vqtool.train.checkpoint import CheckpointError, load_checkpoint
    from vqtool.train.config import ModelConfig, TrainConfig, preset_settings
    from vqtool.train.loop import CHECKPOINT_NAME, TrainingStopped, fit

    try:
        if resume is not None:
            if val_data is not None:
                raise VqtoolError(
                    "--val-data cannot change on --resume: the run keeps the validation set it began with"
                )
            saved = load_checkpoint(resume / CHECKPOINT_NAME)
            model_config, run_dir = saved.model_config, resume
            # The run's own plan stands unless --epochs/--steps say otherwise.
            changes = {k: v for k, v in (("epochs", epochs), ("steps", steps), ("workers", workers)) if v is not None}
            if "epochs" in changes and "steps" not in changes:
                changes["steps"] = None
            config = TrainConfig.from_dict({**saved.train_config.to_dict(), **changes})
            source = Path(saved.data) if saved.data else None
        else:
            explicit = {
                "codes": codes,
                "dim": dim,
                "downsample": downsample,
                "channels": _int_list(channels, "--channels") if channels is not None else None,
                "res_blocks": res_blocks,
                "lookup_dim": lookup_dim,
                "l2_codes": l2_codes,
                "ema": ema,
                "kmeans_init": kmeans_init,
                "restart_dead": restart_dead,
                "lr_schedule": lr_schedule.value if lr_schedule is not None else None,
                "warmup_steps": warmup_steps,
            }
            model_fields, train_fields = preset_settings(preset.value, explicit)
            model_config = ModelConfig(image_size=image_size, **model_fields)
            config = TrainConfig(
                epochs=TrainConfig.epochs if epochs is None else epochs,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                beta=beta,
                seed=seed,
                device=device,
                ema_decay=ema_decay,
                steps_per_epoch=steps_per_epoch,
                max_pixels=max_pixels,
                skip_bad=skip_bad,
                val_data=str(val_data) if val_data is not None else None,
                workers=workers,
                **train_fields,
            )
            run_dir, source = out_dir or next_run_dir(Path("runs")), data
            if (run_dir / CHECKPOINT_NAME).exists():
                raise VqtoolError(
                    f"already holds a run; continue it with --resume {run_dir} or pick another --out", run_dir
                )
    except (ValueError, CheckpointError) as exc:
        raise VqtoolError(str(exc)) from None
    training_set = _load_training_set(
        source, model_config.image_size, config.max_pixels, config.skip_bad, config.val_data
    )
    held_out = f"from {config.val_data}" if config.val_data else "held out"
    _say(f"data: {source or 'embedded default photographs'} — {len(training_set.val)} validation images {held_out}")
    try:
        result = fit(
            model_config,
            config,
            training_set,
            run_dir,
            data_source=str(source) if source else None,
            resume=resume is not None,
            show_progress=err.is_terminal,
        )
    except (TrainingStopped, CheckpointError) as exc:
        raise VqtoolError(str(exc)) from None
    if not result.is_main:  # other torchrun processes: rank 0 reports
        return
    if result.skipped:
        from vqtool.images import describe_skipped

        _say(f"{source}: training {describe_skipped(result.skipped, getattr(training_set, 'epoch_size', None))}")
    final = result.final
    minutes, seconds = divmod(int(result.seconds), 60)
    board_dir = result.run_dir / "tensorboard"
    board = f"tensorboard: {board_dir}/ (tensorboard --logdir {board_dir})\n" if board_dir.is_dir() else ""
    if result.interrupted:
        _say(f"interrupted: checkpoint saved at step {result.steps}; continue with: vqtool train --resume {run_dir}")
    _result(
        f"trained {result.steps} steps in {minutes}m{seconds:02d}s: val PSNR {final['val_psnr']:.2f} dB, "
        f"val MSE {final['val_mse']:.4f}, codebook usage {final['usage']:.1%} "
        f"({int(final['codes_used'])}/{model_config.codes} codes), perplexity {final['perplexity']:.1f}\n"
        f"checkpoint: {result.checkpoint}\nmetrics:    {result.metrics}\n"
        f"figures:    {result.figures}/ (loss.png, recon_step*.png)\n{board}"
        f"next:       vqtool export {result.checkpoint}"
    )
    if result.interrupted:
        raise typer.Exit(130)  # the shell's code for Ctrl-C, after a clean save


def _show_verification(verification: dict[str, Any]) -> None:
    from vqtool.tables import parity_table

    reports = verification["reports"]
    naive = verification.get("naive_fp16_for_comparison")
    out.print(parity_table(reports + ([naive] if naive else [])))
    if naive:
        _say("fp16-naive is shown for comparison only (all FP16, quantizer included); it is not exported")
    for r in reports:
        if r.get("decoded") == "own":
            _say(
                f"{r['precision']}: codes may differ from PyTorch's (a differing code is at most "
                f"{r['max_gap_rtol']:.0%} farther from the latent); decoded, they change the reconstructions' "
                f"PSNR against the input images by {-r['quality_drop_db']:+.2f} dB"
            )
    for reason in verification["skipped"]:
        _say(f"not checked: {reason}")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise VqtoolError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise VqtoolError(f"{option} needs at least one value")
    return values


def _flag_list(text: str, option: str) -> tuple[bool, ...]:
    words = {"no": False, "off": False, "false": False, "0": False, "yes": True, "on": True, "true": True, "1": True}
    values = tuple(words.get(v.strip().lower()) for v in text.split(",") if v.strip())
    if not values or None in values:
        raise VqtoolError(f"{option} takes comma-separated yes/no values, got {text!r}")
    return values  # type: ignore[return-value]


@app.command()
@user_errors
def sweep(
    codes: Annotated[
        str | None, typer.Option(help="Codebook sizes K, comma-separated (default 64,128,256,512, or the preset's K).")
    ] = None,
    dim: Annotated[
        str | None, typer.Option(help="Latent sizes D, comma-separated (default 64,128,256,512, or the preset's D).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Repeated runs (seeds 0..N-1) per variant.")] = 3,
    preset: PresetOption = Preset.seed,
    downsample: Annotated[str | None, typer.Option(help="Downsampling factors, comma-separated (16,8,4,2).")] = None,
    channels: Annotated[
        list[str] | None,
        typer.Option(
            help="Encoder widths, comma-separated; repeat the option for several (--channels 32,64,128 "
            "--channels 64,128,256)."
        ),
    ] = None,
    res_blocks: Annotated[str | None, typer.Option(help="Residual block counts, comma-separated.")] = None,
    lookup_dim: Annotated[
        str | None, typer.Option(help="Lookup dimensions, comma-separated; 0 looks codes up in D itself.")
    ] = None,
    l2_codes: Annotated[str | None, typer.Option(help="l2-normalised codes: no, yes or no,yes.")] = None,
    data: DataOption = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Sweep folder: one run directory per (variant, seed).")] = Path(
        "runs/sweep"
    ),
    epochs: EpochsOption = None,
    steps: StepsOption = None,
    steps_per_epoch: StepsPerEpochOption = None,
    batch_size: BatchOption = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    lr_schedule: LrScheduleOption = None,
    warmup_steps: WarmupOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    ema: EmaOption = None,
    kmeans_init: KmeansOption = None,
    restart_dead: RestartOption = None,
    title: Annotated[
        str | None, typer.Option(help="Heading of the summary (default: the axes swept).", show_default=False)
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Also put the summary into this markdown file, as its own section (a later sweep into the same "
            "--out replaces it), with its figures in figures/SWEEP_FOLDER_NAME/ beside it."
        ),
    ] = None,
) -> None:
    """Train every combination of the listed values over several seeds; summary table, curves with 95% CIs."""
    _require_torch("sweep")
    import shlex

    from vqtool.atomic import write_bytes, write_json
    from vqtool.train.config import ModelConfig, TrainConfig, preset_settings
    from vqtool.train.sweep import (
        draw_figures,
        publish_report,
        report_markdown,
        run_sweep,
        summarise,
        summary_table,
        sweep_variants,
    )

    # Without a preset, K and D default to the article's sweep; with one, to the preset's own values.
    codes = codes or ("64,128,256,512" if preset is Preset.seed else None)
    dim = dim or ("64,128,256,512" if preset is Preset.seed else None)
    lists: dict[str, Any] = {
        "codes": _int_list(codes, "--codes") if codes else None,
        "dim": _int_list(dim, "--dim") if dim else None,
        "downsample": _int_list(downsample, "--downsample") if downsample else None,
        "channels": [_int_list(c, "--channels") for c in channels] if channels else None,
        "res_blocks": _int_list(res_blocks, "--res-blocks") if res_blocks else None,
        "lookup_dim": [d or None for d in _int_list(lookup_dim, "--lookup-dim")] if lookup_dim else None,
        "l2_codes": _flag_list(l2_codes, "--l2-codes") if l2_codes else None,
    }
    explicit = {
        "ema": ema,
        "kmeans_init": kmeans_init,
        "restart_dead": restart_dead,
        "lr_schedule": lr_schedule.value if lr_schedule is not None else None,
        "warmup_steps": warmup_steps,
    }
    try:
        model_fields, train_fields = preset_settings(preset.value, explicit)
        base = TrainConfig(
            epochs=TrainConfig.epochs if epochs is None else epochs,
            steps=steps,
            steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            lr=lr,
            device=device,
            **train_fields,
        )
        variants = sweep_variants(ModelConfig(**model_fields), {k: v for k, v in lists.items() if v is not None})
    except ValueError as exc:
        raise VqtoolError(str(exc)) from None
    training_set = _load_training_set(data, variants[0].image_size, base.max_pixels, base.skip_bad)
    runs = run_sweep(variants, seeds, base, training_set, str(data) if data else None, out_dir, log=_say)
    rows = summarise(runs, base.beta)
    figures = draw_figures(rows, out_dir / "figures")
    command = "vqtool " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    # The runs' own training time, so a re-run that only re-summarises still reports what training cost.
    training_seconds = sum(float(run.final.get("elapsed_s", 0.0)) for run in runs)
    text = report_markdown(rows, figures, command, training_seconds, title=title)
    write_json(out_dir / "summary.json", {"command": command, "rows": rows})
    write_bytes(out_dir / "summary.md", text.encode())
    if report is not None:
        # One section per sweep folder, or per title: two summaries of one folder's runs keep both sections.
        key = out_dir.resolve().name
        if title:
            key += "-" + "-".join("".join(c if c.isalnum() else " " for c in title.lower()).split())[:24]
        published = report_markdown(rows, figures, command, training_seconds, f"figures/{key}/", title=title)
        publish_report(published, figures, report, key)
    _result("\n".join(summary_table(rows)))
    _result(f"summary: {out_dir / 'summary.md'} (figures in {out_dir / 'figures'})")


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
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Also write an INT8 encoder for CPUs (ONNX Runtime; ~2x FP32 with 8-bit dot-product instructions). "
            "Its codes may differ from PyTorch's: parity reports how often.",
        ),
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Images to calibrate INT8 ranges on: a folder, .npy/.npz or CIFAR folder "
            "(default: the data the checkpoint was trained on)."
        ),
    ] = None,
    calibration_images: Annotated[int, typer.Option(help="How many images (crops) to calibrate on.")] = 2048,
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
) -> None:
    """Export encoder/decoder ONNX graphs (and TensorRT engines), and verify parity against PyTorch."""
    if trt:  # before torch is even imported: a missing TensorRT or GPU costs the user nothing
        from vqtool.trt_runtime import require_tensorrt_gpu

        require_tensorrt_gpu()
    _require_torch("export")
    from vqtool.export.onnx_export import PARITY_NAME, ParityFailed, export_model
    from vqtool.export.tensorrt_build import EngineProfile

    target = out_dir or checkpoint.parent / "export"
    profile = EngineProfile(batch_min, batch_opt, batch_max, workspace)
    try:
        result = export_model(
            checkpoint,
            target,
            fp16=fp16,
            int8=int8,
            calibration=calibration,
            calibration_count=calibration_images,
            max_pixels=_pixel_limit(max_pixels),
            trt=trt,
            profile=profile,
            timing_cache=timing_cache,
            log=_say,
        )
    except ParityFailed as failed:
        _show_verification(failed.verification.to_dict())
        raise
    _show_verification(result.verification.to_dict())
    files = sorted(p.name for p in target.iterdir() if p.suffix in (".onnx", ".engine"))
    _result(f"exported {', '.join(files)}, manifest.json and {PARITY_NAME} to {target}")


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
        list[str] | None,
        typer.Option(
            help="Limit to these backends (repeatable): onnxruntime, onnxruntime-trt, tensorrt. "
            "Default: every one that starts here."
        ),
    ] = None,
    naive_fp16: Annotated[
        bool,
        typer.Option(help="Also measure an all-FP16 graph (quantizer in FP16 too), to show what the FP32 island buys."),
    ] = False,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
) -> None:
    """Compare the PyTorch model with every available backend and precision; writes parity.json."""
    _require_torch("parity")
    from vqtool.atomic import write_json
    from vqtool.backends import PYTORCH_FILE
    from vqtool.export.onnx_export import PARITY_NAME, held_out_images
    from vqtool.export.verify import verify_export
    from vqtool.imagesets import read_image_set
    from vqtool.manifest import read_manifest
    from vqtool.train.checkpoint import CheckpointError, load_checkpoint

    manifest = read_manifest(export_dir)
    try:
        checkpoint = load_checkpoint(export_dir / (manifest.pytorch_file or PYTORCH_FILE))
    except CheckpointError as exc:
        raise VqtoolError(str(exc)) from None
    if images is not None:
        pixels = read_image_set(images, manifest.image_size, max_pixels=_pixel_limit(max_pixels))[0]
    else:
        pixels = held_out_images(checkpoint, _say)
    chosen = tuple(backend) if backend else None
    verification = verify_export(
        checkpoint.model, export_dir, manifest, pixels, backends=chosen, naive_fp16=naive_fp16, log=_say
    )
    write_json(export_dir / PARITY_NAME, verification.to_dict())
    _show_verification(verification.to_dict())
    if not verification.reports:
        raise VqtoolError("no backend could run here, so nothing was compared")
    if not verification.passed:
        raise VqtoolError(f"parity failed; details in {export_dir / PARITY_NAME}")
    _result(f"parity passed for {len(verification.reports)} runtime(s); wrote {export_dir / PARITY_NAME}")


BackendOption = Annotated[str, typer.Option(help="auto, onnxruntime, onnxruntime-trt, tensorrt or torch.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
PrecisionOption = Annotated[
    str,
    typer.Option(
        help="fp32; fp16 (needs export --fp16); int8, encode on CPU only (needs export --int8; "
        "codes may differ from PyTorch's, parity.json says how often)."
    ),
]


ReadersOption = Annotated[
    int | None, typer.Option(help="Processes that read image files, at low priority (default: one per core).")
]
ThreadsOption = Annotated[int | None, typer.Option(help="ONNX Runtime threads on the CPU (default: one per core).")]


@app.command()
@user_errors
def encode(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    model: Annotated[Path, typer.Option(help="Export folder made by vqtool export.")],
    out_path: Annotated[Path, typer.Option("--out", help="Output .npy of codes N x h x w.")],
    batch_size: Annotated[int, typer.Option(help="Images per inference batch.")] = 64,
    resize: Annotated[
        bool,
        typer.Option(
            help="Resize images to the model's size; --no-resize keeps sizes that are multiples of the model's "
            "downsampling factor (16 for the default model)."
        ),
    ] = True,
    backend: BackendOption = "auto",
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    shard: Annotated[
        str | None,
        typer.Option(help="Encode only slice I of N (I/N, I from 0) of the sorted file list; join with vqtool merge."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same command.")] = False,
    readers: ReadersOption = None,
    threads: ThreadsOption = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    skip_bad: SkipBadOption = False,
) -> None:
    """Encode images to integer codes with the exported encoder."""
    import signal

    from vqtool.backends import open_runner
    from vqtool.cores import inference_threads
    from vqtool.encode import encode_files
    from vqtool.images import fast_png_available, list_image_names
    from vqtool.manifest import read_manifest
    from vqtool.shards import Shard

    chosen_shard = Shard.parse(shard) if shard is not None else None
    manifest = read_manifest(model)
    opened = open_runner(
        model,
        manifest,
        "encoder",
        backend=backend,
        device=device,
        precision=precision,
        threads=inference_threads(threads),
    )
    files = list_image_names(images)
    if not fast_png_available() and any(name.lower().endswith(".png") for name in files[:1000]):
        _say("reading PNG files with Pillow; pip install 'vqtool[fast-png]' reads them about twice as fast")
    part = f" (shard {chosen_shard.index}/{chosen_shard.count})" if chosen_shard else ""
    _say(f"encoding {len(files)} images{part} in {precision} with {opened.describe()}")

    def stop(signum: int, frame: Any) -> None:  # schedulers preempt with SIGTERM: keep what is done
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    result = encode_files(
        files,
        manifest,
        model,
        opened.runner,
        out_path,
        batch_size=batch_size,
        resize=resize,
        shard=chosen_shard,
        resume=resume,
        workers=readers,
        precision=precision,
        max_pixels=_pixel_limit(max_pixels),
        skip_bad=skip_bad,
        log=_say,
    )
    _result(
        f"wrote {result.codes_path} ({result.count} x {result.grid[0]} x {result.grid[1]} codes) and "
        f"{result.sidecar_path} in {result.seconds:.2f}s ({result.count / result.seconds:.0f} images/s)"
    )


@app.command()
@user_errors
def merge(
    shards: Annotated[list[Path], typer.Argument(help="Shard outputs of vqtool encode --shard I/N (any order).")],
    out_path: Annotated[Path, typer.Option("--out", help="Merged codes .npy (its sidecar is written beside it).")],
) -> None:
    """Join shard outputs into one codes.npy + sidecar, identical to a single pass."""
    from vqtool.shards import merge_shards

    merged = merge_shards(shards, out_path)
    _result(f"merged {len(shards)} shards into {out_path} ({len(merged.files)} images)")


@app.command()
@user_errors
def decode(
    codes: Annotated[Path, typer.Argument(help="codes.npy written by vqtool encode.")],
    model: Annotated[Path, typer.Option(help="Export folder made by vqtool export.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the PNG reconstructions.")],
    batch_size: Annotated[int, typer.Option(help="Code grids per inference batch.")] = 64,
    backend: BackendOption = "auto",
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    writers: Annotated[
        int | None, typer.Option(help="Processes that write PNG files, at low priority (default: one per 2 cores).")
    ] = None,
    threads: ThreadsOption = None,
) -> None:
    """Decode integer codes back to images (one PNG per code grid)."""
    from vqtool.backends import open_runner
    from vqtool.cores import inference_threads
    from vqtool.decode import decode_file
    from vqtool.manifest import read_manifest

    manifest = read_manifest(model)
    opened = open_runner(
        model,
        manifest,
        "decoder",
        backend=backend,
        device=device,
        precision=precision,
        threads=inference_threads(threads),
    )
    _say(f"decoding in {precision} with {opened.describe()}")
    result = decode_file(codes, manifest, opened.runner, out_dir, batch_size=batch_size, workers=writers, log=_say)
    _result(f"wrote {result.count} PNG files to {result.out_dir} in {result.seconds:.2f}s")


@app.command()
@user_errors
def bench(
    export_dir: Annotated[Path, typer.Argument(help="Export folder made by vqtool export.")],
    images: Annotated[
        Path | None, typer.Option(help="Folder of image files for the end-to-end encode benchmark.")
    ] = None,
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes (repeatable; default 1, 32, 256).")] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(help="Limit to these backends (repeatable); PyTorch eager always runs as the baseline."),
    ] = None,
    seconds: Annotated[float, typer.Option(help="Minimum timed seconds per measurement.")] = 1.0,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Where to write bench.json (default: EXPORT_DIR/bench.json).")
    ] = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
) -> None:
    """Benchmark encode/decode per backend against PyTorch eager; with --images, a folder end to end."""
    _require_torch("bench")
    import os

    from vqtool import bench as benchmarks
    from vqtool.atomic import write_json
    from vqtool.images import list_images, read_rgb
    from vqtool.manifest import read_manifest
    from vqtool.tables import bench_table, folder_table

    manifest = read_manifest(export_dir)
    sizes = tuple(batch) if batch else benchmarks.BATCH_SIZES
    if min(sizes) < 1:
        raise VqtoolError(f"--batch must be at least 1, got {min(sizes)}")
    if not seconds > 0:
        raise VqtoolError(f"--seconds must be positive, got {seconds}")
    files = list_images([images]) if images is not None else []
    limit = _pixel_limit(max_pixels)
    for path in files:  # the naive script reads with plain Pillow: check every file before timing anything
        read_rgb(path, limit)
    rows, skipped = benchmarks.model_only(
        export_dir, manifest, batch_sizes=sizes, backends=tuple(backend) if backend else None, seconds=seconds, log=_say
    )
    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "model_only": [vars(r) for r in rows], "skipped": skipped}
    out.print(bench_table(report["model_only"]))
    for reason in skipped:
        _say(f"not measured: {reason}")
    roofline = benchmarks.fp32_roofline(manifest, rows, seconds)
    _say(roofline.describe())
    report["fp32_roofline"] = roofline.to_dict()
    if images is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vqtool-bench-") as scratch:
            folder = benchmarks.folder_encode(files, export_dir, manifest, Path(scratch), log=_say)
        report["folder_encode"] = [result.to_dict() for result in folder]
        out.print(folder_table(report["folder_encode"]))
    target = out_path or export_dir / "bench.json"
    write_json(target, report)
    _result(f"wrote {target}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
