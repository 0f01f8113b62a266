"""What every command shares: the Typer app, the two consoles, one-line errors, and the choice types."""

from __future__ import annotations

import enum
import functools
import inspect
import sys
import typing
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from vqtool.errors import VqtoolError, missing_extra
from vqtool.images.fit import CROPS
from vqtool.model.presets import PRESET_ALIASES, PRESETS
from vqtool.precisions import FASTEST, PRECISIONS
from vqtool.runtime.base import Device

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


def say(message: str) -> None:
    """A note for the user, on stderr."""
    err.print(escape(message), highlight=False)


def print_result(message: str) -> None:
    """A command's result on stdout, printed as is (paths may contain [brackets])."""
    out.print(message, highlight=False, markup=False)


def user_errors(command: F) -> F:
    """Print a VqtoolError (or a full disk) as one line on stderr and exit 1, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except VqtoolError as exc:
            _error_line(exc)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # a full disk is the user's to fix, wherever the write that met it was
            from vqtool.formats.space import out_of_space

            full = out_of_space(exc)
            if full is None:
                raise
            _error_line(full)
            raise typer.Exit(full.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _error_line(exc: VqtoolError) -> None:
    err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


def require_torch(command: str) -> None:
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        raise missing_extra(f"vqtool {command}", "PyTorch", "train") from None


# Options with a fixed set of values are choices: --help lists them and a typo is refused before any work.
# Backends, devices and precisions are the runtime table's own (vqtool.runtime.base).


def choices(name: str, values: Iterable[str]) -> Any:
    """A choice type for Typer whose members are the library's own names (a list's values, or a table's keys), so
    that --help lists them and a typo is refused before any work, and a name added there is offered here."""
    return enum.Enum(name, {value: value for value in values}, type=str)


# Members made at run time are beyond mypy, so to it a choice type is Any; the library's tuple stays the one list.
if TYPE_CHECKING:
    Preset: TypeAlias = Any
    Crop: TypeAlias = Any
    RunPrecision: TypeAlias = Any
else:
    Preset = choices("Preset", (*PRESETS, *PRESET_ALIASES))  # vqtool.model.presets: what each sets
    Crop = choices("Crop", CROPS)  # vqtool.images.fit: how images reach the model's size
    RunPrecision = choices("RunPrecision", (*PRECISIONS, FASTEST))  # vqtool.precisions, and "fastest" of them


DeviceOption = Annotated[Device, typer.Option(help="Where to run: a CUDA GPU if one starts (auto), cpu or cuda.")]
MaxPixelsOption = Annotated[
    int,
    typer.Option(
        help="Refuse image files whose header declares more pixels than this, before decoding them "
        "(decompression bombs). Default: Pillow's warning threshold."
    ),
]


CropOption = Annotated[
    Crop,
    typer.Option(
        help="How images not of the model's size reach it: resize the whole image, or center: resize the short side "
        "and cut the centre square (the preprocessing most published tokenizers were trained with)."
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


OverwriteOption = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing output (without it, an existing output is refused); in a folder, only the files "
        "vqtool wrote there are replaced or removed.",
    ),
]


def pixel_limit(max_pixels: int) -> int:
    from vqtool.images.reading import allow_pixels

    allow_pixels(max_pixels)
    return max_pixels


def shared_options(options: dict[str, tuple[Any, Any]]) -> Callable[[F], F]:
    """Declare options once for several commands: `options` maps each parameter's name to its (Annotated type,
    default); the command takes them together as its keyword `options`, a dict, and Typer sees them as its own."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, (annotation, default) in options.items()
        ]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in options if name in kwargs}
            return command(*args, options=given, **kwargs)

        parameters = [p for p in own if p.name != "options"] + added
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper  # type: ignore[return-value]

    return decorate
