"""uint8 images -> PNG files: a small, fast PNG encoder, and files written under a temporary name and renamed."""

from __future__ import annotations

import contextlib
import os
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vqtool.images.reading import PNG_SIGNATURE


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


# Deflate saves little on a small noisy reconstruction, and a file that small takes one 4 KiB filesystem block
# either way: below this many bytes of rows, store them uncompressed.
STORE_BELOW_BYTES = 4096


def _png_idat(rows: np.ndarray) -> bytes:
    return _png_chunk(b"IDAT", zlib.compress(rows, 0 if rows.nbytes < STORE_BELOW_BYTES else 1))  # type: ignore[arg-type]


def png_bytes(pixels: np.ndarray) -> bytes:
    """A standard 8-bit RGB PNG: one IDAT, no row filters, zlib level 1 (stored when tiny).

    Pillow's encoder spends most of a small image's time in Python; this is several times faster, at the
    cost of somewhat larger files. Any PNG reader reads it; Pillow reads back the exact pixels.
    """
    height, width, _ = pixels.shape
    return _png_head(height, width) + _png_idat(_png_rows(pixels[None])[0]) + _IEND


def _partial_name(path: str) -> str:
    """Where a PNG is written before it is renamed into place: `.NAME.PID.tmp` beside it."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


# What _partial_name makes of a PNG's name: what a writer killed part way leaves (clear_partial_pngs).
_PARTIAL_PNG = re.compile(r"\..+\.png\.\d+\.tmp")


def clear_partial_pngs(folder: Path) -> None:
    """Remove the half-written PNGs that killed writers left in `folder` (call it holding the folder's lock)."""
    for entry in folder.iterdir():
        if _PARTIAL_PNG.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)


def _replace_with(path: str, data: bytes) -> None:
    """Write `data` under a temporary name of its own beside `path` (created exclusively, so never through a
    planted link), then rename it into place."""
    temp = _partial_name(path)
    try:
        try:
            handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # left by a killed process that had this pid: nobody writes it now
            os.unlink(temp)
            handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    final name, and syncing each of thousands of small files would cost most of decode's time.
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
