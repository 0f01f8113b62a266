"""Image sets: the images of any collection in row order, each row's key, name and what a reader needs to read it.
Every reader of images (encode on either engine, training, export, parity, calibration, the API) takes one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from vqtool.data.arrays import array_row
from vqtool.data.parquet import parquet_cells
from vqtool.data.refs import (
    ARRAY_ROW,
    FILE,
    TAR_MEMBER,
    ArrayRow,
    Decoded,
    Encoded,
    ImageRef,
    Locators,
    TarMember,
)
from vqtool.data.tar import read_member
from vqtool.images.reading import decode_rgb, read_rgb


def ref_pixels(ref: ImageRef, max_pixels: int) -> np.ndarray:
    """The uint8 H x W x 3 pixels of one image, or a one-line VqtoolError naming it."""
    if isinstance(ref, str):
        return read_rgb(ref, max_pixels)
    if isinstance(ref, TarMember):
        return decode_rgb(read_member(ref), ref.name, max_pixels)
    if isinstance(ref, Encoded):
        return decode_rgb(ref.data, ref.name, max_pixels)
    if isinstance(ref, ArrayRow):
        return array_row(ref)
    assert isinstance(ref, Decoded)
    return ref.pixels


@runtime_checkable
class ImageSet(Protocol):
    """Images in row order: what `vqtool encode` reads, on one machine or on Ray."""

    @property
    def keys(self) -> Sequence[str]:
        """One per image, in row order: what the output names each row by."""
        ...

    def name(self, index: int) -> str:
        """The image as messages and skipped-file lists name it (a path, `shard.tar:key.jpg`, `file.parquet#row`)."""
        ...

    def refs(self, start: int, stop: int) -> list[ImageRef]:
        """What reader processes need for rows start..stop; asked for in increasing order within one run."""
        ...

    def sliced(self, start: int, stop: int) -> ImageSet:
        """Rows start..stop as a set of their own (a --shard)."""
        ...

    def locators(self) -> Locators:
        """Where every row's image is, as columns: what tasks on other machines read them by (Ray)."""
        ...


def located_refs(
    kinds: Sequence[int] | np.ndarray,
    sources: Sequence[str] | np.ndarray,
    offsets: Sequence[int] | np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    names: Sequence[str] | np.ndarray,
    image_column: str | None,
) -> list[ImageRef]:
    """The refs of located rows (Ray tasks read by them); the Parquet rows among them are read here, each row group
    once."""
    refs: list[ImageRef | None] = [None] * len(kinds)
    wanted: dict[str, list[tuple[int, int]]] = {}
    for i, kind in enumerate(kinds):
        if kind == FILE:
            refs[i] = str(sources[i])
        elif kind == TAR_MEMBER:
            refs[i] = TarMember(str(names[i]), str(sources[i]), int(offsets[i]), int(sizes[i]))
        elif kind == ARRAY_ROW:
            refs[i] = ArrayRow(str(names[i]), str(sources[i]), int(offsets[i]))
        else:
            wanted.setdefault(str(sources[i]), []).append((int(offsets[i]), i))
    for path, rows in wanted.items():
        assert image_column is not None, "Parquet rows need their image column"
        for (_, i), data in zip(rows, parquet_cells(path, [row for row, _ in rows], image_column), strict=True):
            refs[i] = Encoded(str(names[i]), data)
    return [ref for ref in refs if ref is not None]


@dataclass(frozen=True)
class FileSet:
    """Image files: each row's key, name and load are its path."""

    paths: Sequence[str]

    @property
    def keys(self) -> Sequence[str]:
        return self.paths

    def name(self, index: int) -> str:
        return self.paths[index]

    def refs(self, start: int, stop: int) -> list[ImageRef]:
        return list(self.paths[start:stop])

    def sliced(self, start: int, stop: int) -> FileSet:
        return FileSet(self.paths[start:stop])

    def locators(self) -> Locators:
        count = len(self.paths)
        none = np.full(count, -1, np.int64)
        return Locators(np.full(count, FILE, np.int8), list(self.paths), none, none, list(self.paths))


class ChainedSet:
    """Several sets one after another (a folder, then a tar shard, ...): rows in the order the inputs were given."""

    def __init__(self, parts: tuple[ImageSet, ...]) -> None:
        self.parts = parts
        self._keys = [key for part in parts for key in part.keys]

    @property
    def keys(self) -> Sequence[str]:
        return self._keys

    def _where(self, index: int) -> tuple[int, int]:
        for number, part in enumerate(self.parts):
            if index < len(part.keys):
                return number, index
            index -= len(part.keys)
        raise IndexError(index)

    def name(self, index: int) -> str:
        number, inner = self._where(index)
        return self.parts[number].name(inner)

    def refs(self, start: int, stop: int) -> list[ImageRef]:
        taken: list[ImageRef] = []
        first = 0
        for part in self.parts:
            count = len(part.keys)
            low, high = max(start - first, 0), min(stop - first, count)
            if low < high:
                taken += part.refs(low, high)
            first += count
        return taken

    def sliced(self, start: int, stop: int) -> ImageSet:
        parts, first = [], 0
        for part in self.parts:
            count = len(part.keys)
            low, high = max(start - first, 0), min(stop - first, count)
            if low < high:
                parts.append(part.sliced(low, high))
            first += count
        return parts[0] if len(parts) == 1 else ChainedSet(tuple(parts))

    def locators(self) -> Locators:
        return Locators.joined([part.locators() for part in self.parts])

    @property
    def image_column(self) -> str | None:
        return next((c for p in self.parts if (c := getattr(p, "image_column", None)) is not None), None)


def as_image_set(images: ImageSet | Sequence[str | Path]) -> ImageSet:
    """A set as it is, or a list of image paths as a FileSet."""
    if isinstance(images, ImageSet):
        return images
    return FileSet([str(path) for path in images])
