"""Finding, reading and writing image files as uint8 H x W x 3 RGB arrays (torch-free)."""

from __future__ import annotations

import functools
import io
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vqtool.errors import VqtoolError, first_line
from vqtool.images.limits import DEFAULT_MAX_PIXELS

N = TypeVar("N")
T = TypeVar("T")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def _find_images(folder: str, found: list[str]) -> None:
    """Image files under `folder`, recursively; symlinked folders are not entered (as Path.rglob)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _find_images(entry.path, found)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                found.append(entry.path)


def list_image_names(inputs: Iterable[Path | str]) -> list[str]:
    """Image files named directly or found recursively under folders, as path strings in a stable sorted order.

    Strings, not Paths: a Path object costs several times the string's memory, and encode holds the whole
    sorted list. The order is by path string, so the same inputs give the same order everywhere.
    """
    found: set[str] = set()
    for item in map(Path, inputs):
        if item.is_dir():
            matches: list[str] = []
            _find_images(str(item), matches)
            if not matches:
                raise VqtoolError(f"no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})", item)
            found.update(matches)
        elif item.is_file():
            found.add(str(item))
        else:
            raise VqtoolError("no such file or folder", item)
    return sorted_names(found)


def sorted_names(names: Iterable[str]) -> list[str]:
    """The one order of file lists everywhere (encode rows, shards, merge): by path with '/' separators."""
    return sorted(names, key=lambda name: name.replace(os.sep, "/"))


def list_images(inputs: Iterable[Path | str]) -> list[Path]:
    """As list_image_names, as Paths: for lists small enough that their size does not matter."""
    return [Path(name) for name in list_image_names(inputs)]


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 RGB; 16-bit and 32-bit grey are scaled, not clipped."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        grey = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# Formats whose files carry an EXIF orientation; others are rotated only if they hold an EXIF block.
EXIF_FORMATS = frozenset({"JPEG", "MPO", "WEBP", "TIFF"})


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@functools.cache
def _libspng() -> Any | None:
    """pyspng if the fast-png extra is installed; looked up once, since a failed import is paid for each time."""
    try:
        import pyspng
    except ModuleNotFoundError:
        return None
    return pyspng


def fast_png_available() -> bool:
    return _libspng() is not None


def allow_pixels(max_pixels: int) -> None:
    """Let Pillow open images up to `max_pixels` (its own bomb check would refuse past twice its default).

    For the process that owns the command line (and its forked readers): read_rgb checks the declared
    size against `max_pixels` itself, before decoding, so Pillow's check only has to stay out of the way.
    """
    if max_pixels < 1:
        raise VqtoolError(f"--max-pixels must be at least 1, got {max_pixels}")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


@dataclass(frozen=True)
class SkippedFile:
    """A file left out under --skip-bad, and the one-line reason it could not be used."""

    file: str
    reason: str

    @classmethod
    def of(cls, error: VqtoolError, file: str | Path) -> SkippedFile:
        return cls(str(file), error.reason)

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}


def read_each(
    names: Iterable[N],
    read: Callable[[N], T],
    skipped: list[SkippedFile] | None,
    file_of: Callable[[N], str] = str,
) -> Iterator[tuple[N, T]]:
    """(name, read(name)) for each name that reads. A file that cannot be read (VqtoolError) stops the reading,
    unless `skipped` is given (--skip-bad): then it is recorded there, as file_of(name), and the reading goes on."""
    for name in names:
        try:
            value = read(name)
        except VqtoolError as error:
            if skipped is None:
                raise
            skipped.append(SkippedFile.of(error, file_of(name)))
            continue
        yield name, value


def describe_skipped(skipped: Sequence[SkippedFile], total: int | None, shown: int = 3) -> str:
    """'skipped 2 of 100 files that could not be read: a.png (reason); ...' for the console (no total: unknown)."""
    first = "; ".join(f"{s.file} ({s.reason})" for s in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    counted = f"{len(skipped)} of {total}" if total is not None else f"{len(skipped)}"
    return f"skipped {counted} files that could not be used: {first}{more}"


def _check_pixels(width: int, height: int, max_pixels: int, path: str | Path) -> None:
    if width * height > max_pixels:
        raise VqtoolError(
            f"declares {width}x{height} = {width * height:,} pixels, more than --max-pixels {max_pixels:,} "
            "(refused before decoding; raise --max-pixels if the image is genuine)",
            path,
        )


def _read_rgb8_png(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """8-bit RGB PNGs through libspng (the fast-png extra), or None for Pillow to read.

    For small images Pillow's per-file Python work dominates, and reading files costs about as much CPU as
    INT8 inference (docs/design-measurements.md, "Reading and writing image files").
    """
    if _libspng() is None:
        return None
    try:
        data = _read_file(path)
    except OSError:
        return None
    return _decode_rgb8_png(data, path, max_pixels)


def _read_file(path: str | Path) -> bytes:
    """A file's bytes through the bare system calls: for a small PNG, open() and its buffered reader cost a
    noticeable share of reading and decoding it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(descriptor).st_size
        chunks = [os.read(descriptor, size + 1)]
        if len(chunks[0]) == size:  # the whole file, in the usual single call
            return chunks[0]
        while chunks[-1]:  # a short read, or a file that changed size since fstat: read on to the end
            chunks.append(os.read(descriptor, 1 << 20))
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def _decode_rgb8_png(data: bytes, path: str | Path, max_pixels: int) -> np.ndarray | None:
    """The bytes of an 8-bit RGB PNG through libspng, or None for Pillow to decode.

    Only 8-bit RGB without an EXIF block takes this path, so the pixels are exactly Pillow's; anything
    else, or any error, goes to Pillow, which then gives the one-line error.
    """
    pyspng = _libspng()
    if pyspng is None:
        return None
    # Signature, then IHDR: length, "IHDR", width, height, bit depth (byte 24), colour type (byte 25; 2 = RGB).
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or data[24:26] != b"\x08\x02":
        return None
    if b"eXIf" in data:
        return None
    width, height = struct.unpack(">II", data[16:24])
    _check_pixels(width, height, max_pixels, path)
    try:
        pixels = pyspng.load(data)
    except Exception:  # libspng's errors (RuntimeError, ValueError, ...) mean: let Pillow read or refuse it
        return None
    return pixels if pixels.dtype == np.uint8 and pixels.shape[2:] == (3,) else None


def read_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image file to uint8 H x W x 3, or raise a one-line error naming the file.

    Images whose header declares more than `max_pixels` are refused before any pixel is decoded.
    """
    if str(path)[-4:].lower() == ".png":
        fast = _read_rgb8_png(path, max_pixels)
        if fast is not None:
            return fast
    return _pillow_rgb(path, path, max_pixels)


def decode_rgb(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """As read_rgb, for an image file's bytes (a member of a tar shard, say); errors name `name`."""
    if name[-4:].lower() == ".png":
        fast = _decode_rgb8_png(data, name, max_pixels)
        if fast is not None:
            return fast
    return _pillow_rgb(io.BytesIO(data), name, max_pixels)


def _pillow_rgb(source: str | Path | io.BytesIO, path: str | Path, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Pillow warns between its threshold and twice it; our own check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _check_pixels(image.width, image.height, max_pixels, path)
                if "exif" in image.info or image.format in EXIF_FORMATS:
                    image = ImageOps.exif_transpose(image)  # type: ignore[assignment]
                image.load()
                return np.asarray(image) if image.mode == "RGB" else _to_rgb(image)
    except VqtoolError:
        raise
    except UnidentifiedImageError:
        raise VqtoolError("not an image file (or a format Pillow cannot read)", path) from None
    except FileNotFoundError:
        raise VqtoolError("no such file", path) from None
    except IsADirectoryError:
        raise VqtoolError("is a folder, not an image file", path) from None
    except Image.DecompressionBombError as exc:
        reason = f"declares more than --max-pixels {max_pixels:,} pixels; refused before decoding ({exc})"
        raise VqtoolError(reason, path) from None
    except MemoryError:
        raise VqtoolError("too large to decode in the memory available", path) from None
    except Exception as exc:
        # Pillow reports truncated and corrupt data as OSError, SyntaxError, ValueError, struct.error,
        # EOFError, IndexError... in its own words, depending on the format's plugin: all of them mean
        # this file cannot be read.
        reason = first_line(exc)
        raise VqtoolError(f"unreadable or truncated image ({reason})", path) from None
