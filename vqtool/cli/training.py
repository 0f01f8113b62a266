"""`vqtool train` and `vqtool sweep`: options in, the training library (vqtool.train) called, results printed.

torch is imported inside the commands, so the rest of the command line works where it is not installed.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias

import typer

from vqtool.cli.common import (
    Device,
    DeviceOption,
    MaxPixelsOption,
    Preset,
    SkipBadOption,
    app,
    choices,
    err,
    pixel_limit,
    print_result,
    require_torch,
    say,
    shared_options,
    user_errors,
)
from vqtool.errors import VqtoolError
from vqtool.images.limits import DEFAULT_MAX_PIXELS
from vqtool.model.config import LR_SCHEDULES
from vqtool.model.presets import DEFAULT_PRESET, preset_name

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
    typer.Option("--ema", help="Update the codebook by exponential moving averages.", show_default=False),
]
EmaDecayOption = Annotated[float, typer.Option(help="Decay of the --ema averages.")]
KmeansOption = Annotated[
    bool | None,
    typer.Option(
        "--kmeans-init",
        help="Initialise the codebook by k-means on the first batches' encoder outputs.",
        show_default=False,
    ),
]


PresetOption = Annotated[
    Preset,
    typer.Option(
        help="article: the reference design, the model of the article cited in the docs (4 tokens per 32x32 image; "
        "seed is its former name); f8 / f4: the best factor-8 / factor-4 tokenizers measured (README, The model "
        "family). Options given explicitly override the preset."
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
        help="l2-normalise latents and codes before the distance (cosine similarity).",
        show_default=False,
    ),
]


if TYPE_CHECKING:  # a choice type is Any to mypy (vqtool.cli.common says why)
    LrSchedule: TypeAlias = Any
else:
    LrSchedule = choices("LrSchedule", LR_SCHEDULES)  # vqtool.model.config: the learning-rate schedules


LrScheduleOption = Annotated[
    LrSchedule | None,
    typer.Option(
        help="constant (the article's; default) or cosine: decay the rate to 0 over the run.", show_default=False
    ),
]
WarmupOption = Annotated[
    int | None, typer.Option(help="Raise the rate linearly over this many first steps (default 0).", show_default=False)
]
CooldownOption = Annotated[
    int | None,
    typer.Option(
        help="End a constant rate by lowering it linearly to 0 over this many last steps (default 0, or the preset's).",
        show_default=False,
    ),
]
RestartOption = Annotated[
    int | None, typer.Option(help="Re-seed codes unused for this many steps from recent encoder outputs.")
]
RotationOption = Annotated[
    bool | None,
    typer.Option(
        "--rotation-trick/--straight-through",
        help="How the gradient passes the quantizer: rotated onto each code (Fifty et al., 2024) or straight "
        "through (the article's; the default unless a preset says otherwise).",
        show_default=False,
    ),
]
LrOption = Annotated[
    float | None, typer.Option(help="Adam learning rate (default 1e-3, or the preset's).", show_default=False)
]
AdamBeta2Option = Annotated[
    float | None, typer.Option(help="Adam's second-moment decay (default 0.999, PyTorch's).", show_default=False)
]
UsageLossOption = Annotated[
    float | None,
    typer.Option(
        help="Weight of a term that spreads each batch over all K codes (log K minus the entropy of its mean soft "
        "assignment, temperature 0.01; 0: none, the default unless a preset says otherwise).",
        show_default=False,
    ),
]
AverageWeightsOption = Annotated[
    float | None,
    typer.Option(
        help="Keep an exponential moving average of the weights with this decay (e.g. 0.99; 0: none, the default "
        "unless a preset says otherwise); validation, checkpoints and exports use the averaged weights.",
        show_default=False,
    ),
]


# Options `train` and `sweep` share, declared once: each command takes them as its `options` dict.
TRAINING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "preset": (PresetOption, Preset.article),
    "data": (DataOption, None),
    "epochs": (EpochsOption, None),
    "steps": (StepsOption, None),
    "steps_per_epoch": (StepsPerEpochOption, None),
    "batch_size": (BatchOption, 128),
    "lr": (LrOption, None),
    "lr_schedule": (LrScheduleOption, None),
    "warmup_steps": (WarmupOption, None),
    "cooldown_steps": (CooldownOption, None),
    "device": (DeviceOption, Device.auto),
    "ema": (EmaOption, None),
    "kmeans_init": (KmeansOption, None),
    "restart_dead": (RestartOption, None),
    "rotation_trick": (RotationOption, None),
    "adam_beta2": (AdamBeta2Option, None),
    "average_weights": (AverageWeightsOption, None),
    "usage_loss": (UsageLossOption, None),
}


def _run_options(options: dict[str, Any]) -> dict[str, Any]:
    """The shared options as TrainConfig fields (choices as their values), the preset and data left out."""
    return {
        key: value.value if isinstance(value, enum.Enum) else value
        for key, value in options.items()
        if key not in ("preset", "data")
    }


@app.command()
@user_errors
@shared_options(TRAINING_OPTIONS)
def train(
    val_data: ValDataOption = None,
    workers: WorkersOption = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (default: a new runs/run-NNN).")] = None,
    codes: Annotated[int | None, typer.Option(help="Codebook size K (default 256, or the preset's).")] = None,
    dim: Annotated[int | None, typer.Option(help="Latent dimension D (default 256, or the preset's).")] = None,
    image_size: Annotated[int, typer.Option(help="Training image side, a multiple of --downsample.")] = 32,
    downsample: DownsampleOption = None,
    channels: ChannelsOption = None,
    res_blocks: ResBlocksOption = None,
    lookup_dim: LookupDimOption = None,
    l2_codes: L2CodesOption = None,
    beta: Annotated[float, typer.Option(help="Commitment loss weight β.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = 0,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory from its checkpoint.")] = None,
    ema_decay: EmaDecayOption = 0.99,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    skip_bad: SkipBadOption = False,
    *,
    options: dict[str, Any],
) -> None:
    """Train the VQ-VAE; writes checkpoint.pt, metrics.jsonl and figures/ to the run directory."""
    require_torch("train")
    from vqtool.train.run import new_run, resume_run
    from vqtool.train.run import train as run_training

    pixel_limit(max_pixels)
    if resume is not None:
        if val_data is not None:
            raise VqtoolError("--val-data cannot change on --resume: the run keeps the validation set it began with")
        plan = resume_run(resume, epochs=options["epochs"], steps=options["steps"], workers=workers)
    else:
        plan = new_run(
            preset=options["preset"].value,
            data=options["data"],
            out=out_dir,
            image_size=image_size,
            codes=codes,
            dim=dim,
            downsample=downsample,
            channels=_int_list(channels, "--channels") if channels is not None else None,
            res_blocks=res_blocks,
            lookup_dim=lookup_dim,
            l2_codes=l2_codes,
            beta=beta,
            seed=seed,
            ema_decay=ema_decay,
            max_pixels=max_pixels,
            skip_bad=skip_bad,
            val_data=str(val_data) if val_data is not None else None,
            workers=workers,
            **_run_options(options),
        )
    result = run_training(plan, show_progress=err.is_terminal, log=say)
    if not result.is_main:  # other torchrun processes: rank 0 reports
        return
    _print_run(result, plan.model_config.codes)
    if result.interrupted:
        raise typer.Exit(130)  # the shell's code for Ctrl-C, after a clean save


def _print_run(result: Any, codes: int) -> None:
    final = result.final
    minutes, seconds = divmod(int(result.seconds), 60)
    board_dir = result.run_dir / "tensorboard"
    board = f"tensorboard: {board_dir}/ (tensorboard --logdir {board_dir})\n" if board_dir.is_dir() else ""
    if result.interrupted:
        say(
            f"interrupted: checkpoint saved at step {result.steps}; "
            f"continue with: vqtool train --resume {result.run_dir}"
        )
    print_result(
        f"trained {result.steps} steps in {minutes}m{seconds:02d}s: val PSNR {final['val_psnr']:.2f} dB, "
        f"val MSE {final['val_mse']:.4f}, codebook usage {final['usage']:.1%} "
        f"({int(final['codes_used'])}/{codes} codes), perplexity {final['perplexity']:.1f}\n"
        f"checkpoint: {result.checkpoint}\nmetrics:    {result.metrics}\n"
        f"figures:    {result.figures}/ (loss.png, recon_step*.png)\n{board}"
        f"next:       vqtool export {result.checkpoint}"
    )


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
@shared_options(TRAINING_OPTIONS)
def sweep(
    codes: Annotated[
        str | None, typer.Option(help="Codebook sizes K, comma-separated (default 64,128,256,512, or the preset's K).")
    ] = None,
    dim: Annotated[
        str | None, typer.Option(help="Latent sizes D, comma-separated (default 64,128,256,512, or the preset's D).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Repeated runs (seeds 0..N-1) per variant.")] = 3,
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
    out_dir: Annotated[Path, typer.Option("--out", help="Sweep folder: one run directory per (variant, seed).")] = Path(
        "runs/sweep"
    ),
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
    *,
    options: dict[str, Any],
) -> None:
    """Train every combination of the listed values over several seeds; summary table, curves with 95% CIs."""
    require_torch("sweep")
    import shlex

    from vqtool.model.config import ModelConfig, TrainConfig
    from vqtool.model.presets import preset_settings
    from vqtool.train.run import read_training_set
    from vqtool.train.sweep import run_sweep, sweep_variants
    from vqtool.train.sweep_report import publish_sweep, summary_table

    # Without a preset, K and D default to the article's sweep; with one, to the preset's own values.
    preset, data = options["preset"], options["data"]
    reference = preset_name(preset.value) == DEFAULT_PRESET
    codes = codes or ("64,128,256,512" if reference else None)
    dim = dim or ("64,128,256,512" if reference else None)
    lists: dict[str, Any] = {
        "codes": _int_list(codes, "--codes") if codes else None,
        "dim": _int_list(dim, "--dim") if dim else None,
        "downsample": _int_list(downsample, "--downsample") if downsample else None,
        "channels": [_int_list(c, "--channels") for c in channels] if channels else None,
        "res_blocks": _int_list(res_blocks, "--res-blocks") if res_blocks else None,
        "lookup_dim": [d or None for d in _int_list(lookup_dim, "--lookup-dim")] if lookup_dim else None,
        "l2_codes": _flag_list(l2_codes, "--l2-codes") if l2_codes else None,
    }
    try:
        model_fields, train_fields = preset_settings(preset.value, _run_options(options))
        base = TrainConfig(**train_fields)
        variants = sweep_variants(ModelConfig(**model_fields), {k: v for k, v in lists.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise VqtoolError(str(exc)) from None
    from vqtool.formats.lock import OutputLock

    with OutputLock(out_dir):  # one sweep per folder at a time
        training_set = read_training_set(data, variants[0].image_size, base, log=say)
        runs = run_sweep(variants, seeds, base, training_set, str(data) if data else None, out_dir, log=say)
        command = "vqtool " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        rows = publish_sweep(runs, base.beta, out_dir, command, title=title, report=report)
    print_result("\n".join(summary_table(rows)))
    print_result(f"summary: {out_dir / 'summary.md'} (figures in {out_dir / 'figures'})")
