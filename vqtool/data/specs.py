"""From what the user names to an image set: image files and folders, `.txt`/`.lst` lists, WebDataset tar shards,
Parquet files, `.npy`/`.npz` arrays and CIFAR-10 folders, each resolved once, here, for every command.

`image_set` is the one entry: `vqtool encode INPUT...`, training's --data and --val-data, export's --images and
--calibration, parity's and the API's inputs all name their images the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from vqtool.data.arrays import ARRAY_SUFFIXES, NpySet, PixelSet, read_array
from vqtool.data.cifar import CIFAR_TEST_BATCH, CIFAR_TRAIN_BATCHES, is_cifar_folder, read_cifar_batch
from vqtool.data.parquet import parquet_rows
from vqtool.data.sets import ChainedSet, FileSet, ImageSet
from vqtool.data.tar import expand_shards, tar_samples
from vqtool.errors import VqtoolError, first_line
from vqtool.images.reading import IMAGE_SUFFIXES, list_image_names

LIST_SUFFIXES = frozenset({".txt", ".lst"})


def _folder_holds_only(path: Path, suffix: str) -> bool:
    names = [entry.name.lower() for entry in os.scandir(path)]
    return any(n.endswith(suffix) for n in names) and not any(Path(n).suffix in IMAGE_SUFFIXES for n in names)


def is_shard_spec(spec: str) -> bool:
    """A .tar file, a brace pattern of them, or a folder holding .tar files and no image files of its own."""
    path = Path(spec)
    if path.is_dir():
        return _folder_holds_only(path, ".tar")
    return path.suffix.lower() == ".tar" or ("{" in spec and ".tar" in spec)


def is_parquet_spec(spec: str) -> bool:
    """A .parquet file, or a folder holding .parquet files and no image files of its own."""
    path = Path(spec)
    if path.is_dir():
        return _folder_holds_only(path, ".parquet")
    return path.suffix.lower() == ".parquet"


def list_file_names(path: Path) -> list[str]:
    """Paths listed one per line (blank lines and # comments ignored), relative to the list's folder."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VqtoolError(f"cannot read as a list of image paths ({first_line(exc)})", path) from None
    folder = path.parent
    names = [str(folder / line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise VqtoolError("lists no image paths", path)
    return names


def collection_exists(spec: str | Path) -> bool:
    """Whether a spec names something on disk; a brace pattern names tar shards checked when expanded."""
    return "{" in str(spec) or Path(spec).exists()


def array_set(path: Path) -> ImageSet:
    """A .npy read row by row, or a .npz read whole."""
    if path.suffix.lower() == ".npy":
        return NpySet.of(path)
    return PixelSet(str(path), read_array(path))


def cifar_set(folder: Path, *, test: bool = False) -> ImageSet:
    """CIFAR-10's training batches (or with `test`, its test batch) as one set of in-memory images."""
    names = (CIFAR_TEST_BATCH,) if test else CIFAR_TRAIN_BATCHES
    parts = tuple(PixelSet(str(folder / name), read_cifar_batch(folder / name)) for name in names)
    return parts[0] if len(parts) == 1 else ChainedSet(parts)


def image_set(
    inputs: Iterable[str | Path], *, image_column: str | None = None, key_column: str | None = None
) -> ImageSet:
    """The images `inputs` name, in row order.

    Image files and folders (searched recursively) together form one sorted list, as always; `.txt`/`.lst`
    lists, tar shards (one .tar, a folder of them, a brace pattern), Parquet files (one, or a folder of them),
    `.npy`/`.npz` arrays and CIFAR-10 folders (their training batches) follow, each in the order given.
    """
    files: list[str] = []
    parts: list[ImageSet] = []
    for item in map(str, inputs):
        path = Path(item)
        if is_shard_spec(item) if ("{" in item or path.exists()) else False:
            parts.append(tar_samples(expand_shards(item)))
        elif path.exists() and is_parquet_spec(item):
            found = [str(p) for p in sorted(path.glob("*.parquet"))] if path.is_dir() else [item]
            parts.append(parquet_rows(found, image_column, key_column))
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            parts.append(FileSet(list_file_names(path)))
        elif path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES:
            parts.append(array_set(path))
        elif is_cifar_folder(path):
            parts.append(cifar_set(path))
        else:
            files.append(item)
    if files:
        parts.insert(0, FileSet(list_image_names(files)))
    if not parts:
        raise VqtoolError("no images to encode")
    return parts[0] if len(parts) == 1 else ChainedSet(tuple(parts))
