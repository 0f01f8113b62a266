"""Where the images to encode come from: files and folders, `.txt` lists, WebDataset tar shards, Parquet files.

Each form becomes an `ImageSet`: the images' keys in row order (a file's path, a tar sample's key, a Parquet row's
key column), a name for messages, and for a run of rows the `ImageRef`s (what reader processes turn into pixels). Files
and tar members are read by position (a member's bytes lie at a known offset of its shard), so reader processes
fetch them in parallel and a resumed or sharded run starts anywhere; Parquet rows are read in order by the
process that plans the batches, since a row's bytes can only be found by reading its row group.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vqtool.errors import VqtoolError, first_line, missing_extra
from vqtool.images.reading import IMAGE_SUFFIXES, decode_rgb, list_image_names, read_rgb

# A sample's image member; keys follow WebDataset's convention: a member's key is its name up to the first dot
# of its base name, so `0001.jpg` and `0001.json` are one sample and `0001.seg.png` is not an image member of it.
SHARD_IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")
LIST_SUFFIXES = frozenset({".txt", ".lst"})
# Image-bytes columns looked for when --image-column is not given: datasets' Image feature, then img2dataset's.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
KEY_COLUMN = "key"


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


# What a reader process is handed for one image: a file's path, a tar member, or encoded bytes.
ImageRef = str | TarMember | Encoded


def ref_name(load: ImageRef) -> str:
    return load if isinstance(load, str) else load.name


def ref_pixels(load: ImageRef, max_pixels: int) -> np.ndarray:
    """The uint8 H x W x 3 pixels of one image, or a one-line VqtoolError naming it."""
    if isinstance(load, str):
        return read_rgb(load, max_pixels)
    if isinstance(load, TarMember):
        try:
            descriptor = os.open(load.shard, os.O_RDONLY)
            try:
                data = os.pread(descriptor, load.size, load.offset)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise VqtoolError(f"cannot read this tar member ({first_line(exc)})", load.name) from None
        if len(data) != load.size:
            raise VqtoolError("the tar shard ends inside this member (truncated)", load.name)
        return decode_rgb(data, load.name, max_pixels)
    return decode_rgb(load.data, load.name, max_pixels)


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


# Locators.kind: how a row's image is read.
FILE, TAR_MEMBER, PARQUET_ROW = 0, 1, 2


@dataclass(frozen=True)
class Locators:
    """Row by row: how the image is read (`kind`), from which file (`source`: an image file, a shard, a Parquet
    file), where in it (`offset`: a member's byte offset or a Parquet row's number; `size`: a member's bytes),
    and its name for messages."""

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


def located_refs(
    kinds: Sequence[int] | np.ndarray,
    sources: Sequence[str] | np.ndarray,
    offsets: Sequence[int] | np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    names: Sequence[str] | np.ndarray,
    image_column: str | None,
) -> list[ImageRef]:
    """The Loads of located rows; the Parquet rows among them are read here, each row group once."""
    refs: list[ImageRef | None] = [None] * len(kinds)
    wanted: dict[str, list[tuple[int, int]]] = {}
    for i, kind in enumerate(kinds):
        if kind == FILE:
            refs[i] = str(sources[i])
        elif kind == TAR_MEMBER:
            refs[i] = TarMember(str(names[i]), str(sources[i]), int(offsets[i]), int(sizes[i]))
        else:
            wanted.setdefault(str(sources[i]), []).append((int(offsets[i]), i))
    for path, rows in wanted.items():
        assert image_column is not None, "Parquet rows need their image column"
        for (_, i), data in zip(rows, _parquet_cells(path, [row for row, _ in rows], image_column), strict=True):
            refs[i] = Encoded(str(names[i]), data)
    return [ref for ref in refs if ref is not None]


def _parquet_cells(path: str, rows: Sequence[int], column: str) -> list[bytes]:
    """The image bytes of some rows of one Parquet file, reading only the row groups that hold them."""
    pq = _pyarrow_parquet()
    reader = pq.ParquetFile(path)
    starts = _group_starts(reader)
    groups = sorted({_group_of(starts, row) for row in rows})
    table = reader.read_row_groups(groups, columns=[column])
    cells = _image_bytes(table.column(0).combine_chunks(), path, column)
    # Where each group read begins in the table: the groups' rows, one group after another.
    sizes = np.diff(starts)[groups]
    begins = dict(zip(groups, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist(), strict=True))
    taken = []
    for row in rows:
        group = _group_of(starts, row)
        taken.append(cells[begins[group] + row - int(starts[group])])
    return taken


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


@dataclass(frozen=True)
class TarSet:
    """Samples of WebDataset tar shards, in shard order and member order within each; read by offset."""

    shards: tuple[str, ...]
    sample_keys: Sequence[str]
    shard_of: np.ndarray  # index into shards, per row
    offsets: np.ndarray
    sizes: np.ndarray
    suffixes: Sequence[str]

    @property
    def keys(self) -> Sequence[str]:
        return self.sample_keys

    def name(self, index: int) -> str:
        return f"{self.shards[self.shard_of[index]]}:{self.sample_keys[index]}.{self.suffixes[index]}"

    def refs(self, start: int, stop: int) -> list[ImageRef]:
        stop = min(stop, len(self.sample_keys))
        return [
            TarMember(self.name(i), self.shards[self.shard_of[i]], int(self.offsets[i]), int(self.sizes[i]))
            for i in range(start, stop)
        ]

    def sliced(self, start: int, stop: int) -> TarSet:
        return TarSet(
            self.shards,
            self.sample_keys[start:stop],
            self.shard_of[start:stop],
            self.offsets[start:stop],
            self.sizes[start:stop],
            self.suffixes[start:stop],
        )

    def locators(self) -> Locators:
        count = len(self.sample_keys)
        return Locators(
            np.full(count, TAR_MEMBER, np.int8),
            [self.shards[i] for i in self.shard_of],
            np.asarray(self.offsets, np.int64),
            np.asarray(self.sizes, np.int64),
            [self.name(i) for i in range(count)],
        )


class ParquetSet:
    """Rows of Parquet files with an image-bytes column (img2dataset's layout, or datasets' Image feature)."""

    def __init__(
        self, files: Sequence[str], rows: Sequence[int], keys: Sequence[str], image_column: str, start: int = 0
    ) -> None:
        self.files, self.rows, self.image_column = tuple(files), tuple(rows), image_column
        self._keys = keys
        self._start = start  # the first row of this set in the files' rows (a shard's slice)
        self._firsts = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        self._cursor: tuple[int, Iterator[Encoded]] | None = None

    @property
    def keys(self) -> Sequence[str]:
        return self._keys

    def _locate(self, index: int) -> tuple[int, int]:
        """(file number, row within it) of the set's row `index`."""
        row = self._start + index
        file = int(np.searchsorted(self._firsts, row, side="right")) - 1
        return file, row - int(self._firsts[file])

    def name(self, index: int) -> str:
        file, row = self._locate(index)
        return f"{self.files[file]}#{row}"

    def refs(self, start: int, stop: int) -> list[ImageRef]:
        stop = min(stop, len(self._keys))
        if self._cursor is None or self._cursor[0] != start:
            self._cursor = (start, self._read_from(start))
        _, rows = self._cursor
        taken: list[ImageRef] = [next(rows) for _ in range(start, stop)]
        self._cursor = (stop, rows)
        return taken

    def _read_from(self, index: int) -> Iterator[Encoded]:
        """Encoded images from the set's row `index` on, a record batch at a time."""
        pq = _pyarrow_parquet()
        file, wanted = self._locate(index)
        for number in range(file, len(self.files)):
            path = self.files[number]
            reader = pq.ParquetFile(path)
            groups, skip = _row_groups_from(reader, wanted)
            position = wanted - skip  # the file's row number of the next cell read
            for batch in reader.iter_batches(batch_size=256, row_groups=groups, columns=[self.image_column]):
                for data in _image_bytes(batch.column(0), path, self.image_column):
                    if position >= wanted:
                        yield Encoded(f"{path}#{position}", data)
                    position += 1
            wanted = 0

    def sliced(self, start: int, stop: int) -> ParquetSet:
        return ParquetSet(self.files, self.rows, self._keys[start:stop], self.image_column, self._start + start)

    def locators(self) -> Locators:
        count = len(self._keys)
        where = [self._locate(i) for i in range(count)]
        return Locators(
            np.full(count, PARQUET_ROW, np.int8),
            [self.files[file] for file, _ in where],
            np.asarray([row for _, row in where], np.int64),
            np.full(count, -1, np.int64),
            [f"{self.files[file]}#{row}" for file, row in where],
        )


def _group_starts(reader: Any) -> np.ndarray:
    """The first row of each row group of a Parquet file, then its row count."""
    counts = [reader.metadata.row_group(g).num_rows for g in range(reader.metadata.num_row_groups)]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _group_of(starts: np.ndarray, row: int) -> int:
    return int(np.searchsorted(starts, row, side="right")) - 1


def _row_groups_from(reader: Any, row: int) -> tuple[list[int], int]:
    """The row groups from the one holding `row` on, and how many of its rows come before `row`."""
    starts = _group_starts(reader)
    if row >= starts[-1]:
        return [], 0
    group = _group_of(starts, row)
    return list(range(group, len(starts) - 1)), row - int(starts[group])


def _image_bytes(column: Any, path: str, name: str) -> list[bytes]:
    """A column's image bytes: binary cells, or the `bytes` field of datasets' {bytes, path} Image structs."""
    import pyarrow as pa

    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise VqtoolError(f"column {name!r} holds {column.type}, not image bytes", path)
    return [b"" if cell is None else cell for cell in column.to_pylist()]


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise missing_extra("reading Parquet files", "pyarrow", "ray") from None
    return pq


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


# ---- recognising the forms --------------------------------------------------------------------------------------


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a brace pattern (`train-{000000..000099}.tar`), a folder of .tar files, or one .tar."""
    try:
        from braceexpand import braceexpand
    except ModuleNotFoundError:
        raise missing_extra("reading tar shards", "braceexpand", "train") from None

    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
    else:
        shards = list(braceexpand(spec)) if "{" in spec else [spec]
    missing = next((s for s in shards if not os.path.isfile(s)), None)
    if missing is not None:
        raise VqtoolError("no such tar shard", missing)
    if not shards:
        raise VqtoolError("no .tar shards here", spec)
    return shards


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


def tar_samples(shards: Sequence[str]) -> TarSet:
    """Every sample with an image member in the shards, located by reading the tar headers only."""
    try:
        from webdataset.tariterators import base_plus_ext
    except ModuleNotFoundError:
        raise missing_extra("reading tar shards", "webdataset", "train") from None
    keys: list[str] = []
    shard_of: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    suffixes: list[str] = []
    for number, shard in enumerate(shards):
        found: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, suffix = base_plus_ext(member.name)
                    if key is not None and suffix is not None and suffix.lower() in SHARD_IMAGE_MEMBERS:
                        found.setdefault(key, {})[suffix.lower()] = member
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise VqtoolError(f"unreadable tar shard ({first_line(exc)})", shard) from None
        for key, members in found.items():
            suffix = next(s for s in SHARD_IMAGE_MEMBERS if s in members)
            keys.append(key)
            shard_of.append(number)
            offsets.append(members[suffix].offset_data)
            sizes.append(members[suffix].size)
            suffixes.append(suffix)
    if not keys:
        raise VqtoolError("no samples with an image member (.png, .jpg, .jpeg or .webp) in these tar shards")
    return TarSet(tuple(shards), keys, np.asarray(shard_of, np.int32), np.asarray(offsets), np.asarray(sizes), suffixes)


def parquet_rows(files: Sequence[str], image_column: str | None, key_column: str | None) -> ParquetSet:
    """The rows of Parquet files: their count from the footers, their keys from the key column (else `file#row`)."""
    pq = _pyarrow_parquet()
    rows: list[int] = []
    keys: list[str] = []
    chosen: str | None = None
    for path in files:
        try:
            reader = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow's ArrowInvalid, OSError, ...: this is no readable Parquet file
            raise VqtoolError(f"not a readable Parquet file ({first_line(exc)})", path) from None
        names = reader.schema_arrow.names
        column = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
        if column is None or column not in names:
            wanted = f"no column {image_column!r}" if image_column else "no image column found"
            raise VqtoolError(f"{wanted} (it has {', '.join(names)}); name it with --image-column", path)
        if chosen is not None and column != chosen:
            raise VqtoolError(f"its image column is {column!r}, the earlier files' {chosen!r}", path)
        chosen = column
        count = reader.metadata.num_rows
        rows.append(count)
        key = key_column or (KEY_COLUMN if KEY_COLUMN in names else None)
        if key_column is not None and key_column not in names:
            raise VqtoolError(f"no column {key_column!r} (it has {', '.join(names)}); name it with --key-column", path)
        if key is None:
            keys += [f"{path}#{row}" for row in range(count)]
        else:
            values = reader.read(columns=[key]).column(0).to_pylist()
            keys += [f"{path}#{row}" if value is None else str(value) for row, value in enumerate(values)]
    assert chosen is not None
    return ParquetSet(files, rows, keys, chosen)


def image_set(
    inputs: Iterable[str | Path], *, image_column: str | None = None, key_column: str | None = None
) -> ImageSet:
    """The images that `vqtool encode INPUT...` names, in row order.

    Image files and folders (searched recursively) together form one sorted list, as always; `.txt`/`.lst`
    lists, tar shards (one .tar, a folder of them, a brace pattern) and Parquet files (one, or a folder of
    them) follow, each in the order given.
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
        else:
            files.append(item)
    if files:
        parts.insert(0, FileSet(list_image_names(files)))
    if not parts:
        raise VqtoolError("no images to encode")
    return parts[0] if len(parts) == 1 else ChainedSet(tuple(parts))
