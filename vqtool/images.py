"""Finding, reading and writing image files as uint8 H x W x 3 RGB arrays (torch-free)."""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vqtool.errors import VqtoolError

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

    Strings, not Paths: a Path costs ~0.6 KB, and encode holds the whole sorted list (100k files:
    ~60 MB as Paths). The order is by path string, so the same inputs give the same order everywhere.
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
    return sorted(found, key=lambda name: name.replace(os.sep, "/"))


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
    """pyspng if the fast-png extra is installed; looked up once, as a failed import costs ~35 µs every time."""
    try:
        import pyspng
    except ModuleNotFoundError:
        return None
    return pyspng


def fast_png_available() -> bool:
    return _libspng() is not None


def _read_rgb8_png(path: str | Path) -> np.ndarray | None:
    """8-bit RGB PNGs through libspng (the fast-png extra), or None for Pillow to read.

    For small images Pillow's per-file Python work dominates (~80 µs for 32x32, against ~45 µs here),
    and reading files costs about as much CPU as INT8 inference. Only 8-bit RGB without an EXIF block
    takes this path, so the pixels are exactly Pillow's; anything else, or any error, goes to Pillow.
    """
    pyspng = _libspng()
    if pyspng is None:
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # Signature, then IHDR: length, "IHDR", width, height, bit depth (byte 24), colour type (byte 25; 2 = RGB).
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or data[24:26] != b"\x08\x02":
        return None
    if b"eXIf" in data:
        return None
    try:
        pixels = pyspng.load(data)
    except RuntimeError:
        return None
    return pixels if pixels.dtype == np.uint8 and pixels.shape[2:] == (3,) else None


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode one image file to uint8 H x W x 3, or raise a one-line error naming the file."""
    if str(path)[-4:].lower() == ".png":
        fast = _read_rgb8_png(path)
        if fast is not None:
            return fast
    try:
        with Image.open(path) as image:
            if "exif" in image.info or image.format in EXIF_FORMATS:
                image = ImageOps.exif_transpose(image)
            image.load()
            return np.asarray(image) if image.mode == "RGB" else _to_rgb(image)
    except UnidentifiedImageError:
        raise VqtoolError("not an image file (or a format Pillow cannot read)", path) from None
    except FileNotFoundError:
        raise VqtoolError("no such file", path) from None
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError with its own wording.
        raise VqtoolError(f"unreadable or truncated image ({exc})", path) from None


def fit_to_size(pixels: np.ndarray, size: int, *, resize: bool, multiple: int, path: str | Path) -> np.ndarray:
    """Resize to size x size, or with resize=False keep the image if its sides are multiples of `multiple`."""
    height, width = pixels.shape[:2]
    if not resize:
        if height % multiple or width % multiple:
            raise VqtoolError(f"{width}x{height} is not a multiple of {multiple}; drop --no-resize to resize it", path)
        return pixels
    if (height, width) == (size, size):
        return pixels
    resized = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


_IEND = _png_chunk(b"IEND", b"")


def _png_head(height: int, width: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header)


def _png_rows(images: np.ndarray) -> np.ndarray:
    """N x H x W x 3 -> N x H x (1 + 3W): each row led by filter type 0 (None), as PNG stores it."""
    count, height, width, _ = images.shape
    rows = np.zeros((count, height, 1 + width * 3), dtype=np.uint8)
    rows[:, :, 1:] = images.reshape(count, height, width * 3)
    return rows


# Deflate costs ~45 µs for a 32x32 reconstruction (noisy data, ~20% saved), yet a file that small
# takes one 4 KiB filesystem block either way: below this many bytes of rows, store them uncompressed.
STORE_BELOW_BYTES = 4096


def _png_idat(rows: np.ndarray) -> bytes:
    return _png_chunk(b"IDAT", zlib.compress(rows, 0 if rows.nbytes < STORE_BELOW_BYTES else 1))


def png_bytes(pixels: np.ndarray) -> bytes:
    """A standard 8-bit RGB PNG: one IDAT, no row filters, zlib level 1 (stored when tiny).

    Pillow's encoder spent ~235 µs per 32x32 image in Python; this is several times faster, at the
    cost of somewhat larger files. Any PNG reader reads it; Pillow reads back the exact pixels.
    """
    height, width, _ = pixels.shape
    return _png_head(height, width) + _png_idat(_png_rows(pixels[None])[0]) + _IEND


def _replace_with(path: str, data: bytes) -> None:
    """Write `data` under a temporary name beside `path`, then rename it into place."""
    folder, name = os.path.split(path)
    temp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(handle, view) :]
        finally:
            os.close(handle)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write uint8 H x W x 3 as PNG under a temporary name, then rename it into place.

    No fsync per file: a crash can lose recent files but never leaves a truncated one under its
    final name, and syncing each of thousands of small files cost 80% of decode time.
    """
    _replace_with(str(path), png_bytes(np.ascontiguousarray(pixels, dtype=np.uint8)))


def write_pngs(folder: Path, names: Sequence[str], images: np.ndarray) -> None:
    """Write a batch of same-sized uint8 images (N x H x W x 3) as PNGs named `names` in `folder`.

    As write_png, with the per-image Python work cut to compressing and writing: the filter bytes
    are added to the whole batch at once and the header is built once.
    """
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    head = _png_head(images.shape[1], images.shape[2])
    base = str(folder)
    for name, rows in zip(names, _png_rows(np.ascontiguousarray(images, dtype=np.uint8)), strict=True):
        _replace_with(os.path.join(base, name), head + _png_idat(rows) + _IEND)
