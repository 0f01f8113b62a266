"""What a reader is handed for one image, and where each image of a set lies (for tasks on other machines)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TarMember:
    """An image inside a tar shard, read by position: `size` bytes at `offset`."""

    name: str  # shard:member, for messages
    shard: str
    offset: int
    size: int


@dataclass(frozen=True)
class Encoded:
    """An image file's bytes already in memory (a Parquet cell), named for messages."""

    name: str
    data: bytes


@dataclass(frozen=True)
class ArrayRow:
    """One image of a uint8 N x H x W x 3 .npy, read by its row."""

    name: str  # file[row], for messages
    path: str
    row: int


@dataclass(frozen=True)
class Decoded:
    """An image already decoded (a row of a .npz or of CIFAR-10's batches, held in memory), named for messages."""

    name: str
    pixels: np.ndarray


# What a reader process is handed for one image: a file's path, a tar member, encoded bytes, an array's row or
# pixels already decoded.
ImageRef = str | TarMember | Encoded | ArrayRow | Decoded


def ref_name(ref: ImageRef) -> str:
    return ref if isinstance(ref, str) else ref.name


# Locators.kind: how a row's image is read.
FILE, TAR_MEMBER, PARQUET_ROW, ARRAY_ROW = 0, 1, 2, 3


@dataclass(frozen=True)
class Locators:
    """Row by row: how the image is read (`kind`), from which file (`source`: an image file, a shard, a Parquet
    file, a .npy), where in it (`offset`: a member's byte offset, a Parquet row's or an array row's number; `size`:
    a member's bytes), and its name for messages."""

    kind: np.ndarray
    source: list[str]
    offset: np.ndarray
    size: np.ndarray
    name: list[str]

    @classmethod
    def joined(cls, parts: Sequence[Locators]) -> Locators:
        return cls(
            np.concatenate([p.kind for p in parts]),
            [s for p in parts for s in p.source],
            np.concatenate([p.offset for p in parts]),
            np.concatenate([p.size for p in parts]),
            [n for p in parts for n in p.name],
        )
