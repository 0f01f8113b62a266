"""uint8 N x H x W x 3 image arrays: a .npy read row by row (never whole, never mapped), a .npz read whole, and the
sets that hand their rows to readers like any other images."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.data.refs import ARRAY_ROW, ArrayRow, Decoded, ImageRef, Locators
from vqtool.errors import VqtoolError, first_line
from vqtool.formats.space import read_npy_header

ARRAY_SUFFIXES = frozenset({".npy", ".npz"})


def _check_array(images: Any, path: Path) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise VqtoolError(f"expected uint8 images shaped N x H x W x 3, got shape {shape}", path)
    if images.dtype != np.uint8:
        raise VqtoolError(f"expected uint8 images, got dtype {images.dtype}", path)
    if len(images) == 0:
        raise VqtoolError("the array holds no images", path)
    return images


class NpyRows:
    """The images of a .npy, read row by row with positioned reads: never read whole, and never mapped.

    A memory map (np.load(mmap_mode="r")) reads only the rows asked for too, but every page it maps counts
    in the process's RSS, and with the kernel's large page-cache folios a few scattered rows can map most of
    the file (docs/performance.md). Reads leave pages in the page cache, outside any process. One
    descriptor per process; os.pread needs no shared file position, so forked readers can share it.
    """

    def __init__(self, path: Path) -> None:
        try:
            with open(path, "rb") as handle:
                _, shape, fortran, dtype = read_npy_header(handle)
                self.offset = handle.tell()
                size = os.fstat(handle.fileno()).st_size
        except Exception as exc:  # whatever NumPy's header parser raises on a damaged file
            raise VqtoolError(f"cannot read as a NumPy array ({first_line(exc)})", path) from None
        if len(shape) != 4 or shape[-1] != 3:
            raise VqtoolError(f"expected uint8 images shaped N x H x W x 3, got shape {shape}", path)
        if dtype != np.uint8:
            raise VqtoolError(f"expected uint8 images, got dtype {dtype}", path)
        if shape[0] == 0:
            raise VqtoolError("the array holds no images", path)
        if fortran:
            raise VqtoolError("is stored in Fortran order; save it in C order (np.ascontiguousarray)", path)
        self.path, self.shape = path, tuple(shape)
        self.row_bytes = int(np.prod(shape[1:]))
        if self.offset + self.row_bytes * shape[0] > size:
            raise VqtoolError(f"is truncated: {shape[0]} images need more bytes than the file holds", path)
        self._fd: tuple[int, int] | None = None  # (pid, descriptor)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        data = os.pread(self._fd[1], self.row_bytes, self.offset + index * self.row_bytes)
        return np.frombuffer(data, np.uint8).reshape(self.shape[1:])


def read_array(path: Path) -> np.ndarray:
    """A uint8 N x H x W x 3 array from a .npy or .npz, read whole."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = list(loaded.keys())
                key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
                if key is None:
                    raise VqtoolError(f"holds several arrays ({', '.join(keys)}); name the images array 'images'", path)
                loaded = loaded[key]
    except VqtoolError:
        raise
    except Exception as exc:  # as codes.load_codes_array: a damaged header can raise whatever NumPy's parser raises
        reason = first_line(exc)
        raise VqtoolError(f"cannot read as a NumPy array ({reason})", path) from None
    return _check_array(loaded, path)


_opened: dict[str, NpyRows] = {}


def array_row(ref: ArrayRow) -> np.ndarray:
    """One row of a .npy, each file opened once per process."""
    rows = _opened.get(ref.path)
    if rows is None:
        rows = _opened[ref.path] = NpyRows(Path(ref.path))
    if not 0 <= ref.row < len(rows):
        raise VqtoolError(f"row {ref.row} is outside the array's {len(rows)} rows", ref.name)
    return rows[ref.row]


@dataclass(frozen=True)
class NpySet:
    """The rows of a .npy as images: each read by position when a reader asks for it."""

    path: str
    count: int
    start: int = 0  # the first row of this set in the file (a shard's slice)

    @classmethod
    def of(cls, path: Path) -> NpySet:
        return cls(str(path), len(NpyRows(path)))

    @functools.cached_property
    def keys(self) -> Sequence[str]:
        return [self.name(i) for i in range(self.count)]

    def name(self, index: int) -> str:
        return f"{self.path}[{self.start + index}]"

    def refs(self, start: int, stop: int) -> list[ImageRef]:
        return [ArrayRow(self.name(i), self.path, self.start + i) for i in range(start, min(stop, self.count))]

    def sliced(self, start: int, stop: int) -> NpySet:
        return NpySet(self.path, max(0, min(stop, self.count) - start), self.start + start)

    def locators(self) -> Locators:
        rows = np.arange(self.start, self.start + self.count, dtype=np.int64)
        return Locators(
            np.full(self.count, ARRAY_ROW, np.int8),
            [self.path] * self.count,
            rows,
            np.full(self.count, -1, np.int64),
            [self.name(i) for i in range(self.count)],
        )


@dataclass(frozen=True)
class PixelSet:
    """Images already in memory (a .npz, CIFAR-10's batches), under the names `source[row]`."""

    source: str
    pixels: np.ndarray
    start: int = 0

    @functools.cached_property
    def keys(self) -> Sequence[str]:
        return [self.name(i) for i in range(len(self.pixels))]

    def name(self, index: int) -> str:
        return f"{self.source}[{self.start + index}]"

    def refs(self, start: int, stop: int) -> list[ImageRef]:
        return [Decoded(self.name(i), self.pixels[i]) for i in range(start, min(stop, len(self.pixels)))]

    def sliced(self, start: int, stop: int) -> PixelSet:
        return PixelSet(self.source, self.pixels[start:stop], self.start + start)

    def locators(self) -> Locators:
        raise VqtoolError(
            "is read whole into memory (a .npz or a CIFAR-10 folder), which Ray's tasks cannot share; encode it "
            "with --engine local, or save it as a .npy",
            self.source,
        )
