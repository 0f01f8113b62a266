"""Parquet files whose rows hold images' bytes (img2dataset's layout, or datasets' Image feature): their rows
counted from the footers, their keys from a key column, their cells read a row group at a time (pyarrow, the `ray`
extra)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from vqtool.data.refs import PARQUET_ROW, Encoded, ImageRef, Locators
from vqtool.errors import VqtoolError, first_line, missing_extra

# Image-bytes columns looked for when --image-column is not given: datasets' Image feature, then img2dataset's.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
KEY_COLUMN = "key"


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


def _check_image_type(kind: Any, path: str, name: str) -> None:
    """Image bytes: binary cells, or datasets' {bytes, path} Image structs with a binary `bytes` field."""
    import pyarrow as pa

    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        kind = kind.field("bytes").type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise VqtoolError(f"column {name!r} holds {kind}, not image bytes", path)


def _image_bytes(column: Any, path: str, name: str) -> list[bytes]:
    """A column's image bytes: binary cells, or the `bytes` field of datasets' {bytes, path} Image structs."""
    import pyarrow as pa

    _check_image_type(column.type, path, name)
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return [b"" if cell is None else cell for cell in column.to_pylist()]


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise missing_extra("reading Parquet files", "pyarrow", "ray") from None
    return pq


def parquet_cells(path: str, rows: Sequence[int], column: str) -> list[bytes]:
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
        _check_image_type(reader.schema_arrow.field(column).type, path, column)  # before any output, not mid-run
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
