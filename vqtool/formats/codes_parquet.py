"""codes.parquet: one row per image (`key`, `codes`, `height`, `width`), the sidecar in the file's metadata.

The form data pipelines read (Ray Data, pandas, Polars, Spark, DuckDB): `codes` is the h x w grid in row-major
order as a list of the smallest unsigned type that holds the model's codes, and the schema's metadata holds,
under `vqtool.codes`, what codes.json holds beside a codes.npy but the file list (the `key` column is that).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.errors import VqtoolError, first_line, missing_extra
from vqtool.formats.atomic import atomic_output
from vqtool.formats.codes import CodesSidecar, sidecar_from

METADATA_KEY = b"vqtool.codes"
ROWS_PER_GROUP = 8192


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401  (pa.parquet below)
    except ModuleNotFoundError:
        raise missing_extra("codes.parquet", "pyarrow", "ray") from None
    return pa


def write_codes_parquet(out: Path, codes: np.ndarray, keys: Sequence[str], sidecar: CodesSidecar) -> None:
    """Write N x h x w `codes` (a memory map is read a row group at a time) with their keys, atomically."""
    pa = _pyarrow()
    if len(keys) != len(codes):
        raise ValueError(f"{len(keys)} keys for {len(codes)} grids")
    height, width = codes.shape[1:]
    values = pa.from_numpy_dtype(codes.dtype)
    described = {name: value for name, value in sidecar.to_dict().items() if name != "files"}
    schema = pa.schema(
        [("key", pa.string()), ("codes", pa.list_(values)), ("height", pa.int32()), ("width", pa.int32())],
        metadata={METADATA_KEY: json.dumps(described, sort_keys=True).encode()},
    )
    with atomic_output(out) as temp, pa.parquet.ParquetWriter(temp, schema) as writer:
        for start in range(0, len(codes), ROWS_PER_GROUP):
            grids = np.ascontiguousarray(codes[start : start + ROWS_PER_GROUP])
            rows = len(grids)
            offsets = np.arange(0, (rows + 1) * height * width, height * width, dtype=np.int32)
            columns = [
                pa.array(keys[start : start + rows], pa.string()),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(grids.reshape(-1), values)),
                pa.array(np.full(rows, height, np.int32)),
                pa.array(np.full(rows, width, np.int32)),
            ]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))


class ParquetCodes:
    """A codes.parquet read as N x h x w grids, a run of rows at a time: big files never sit in memory whole."""

    def __init__(self, path: Path, rows: int, grid: tuple[int, int]) -> None:
        self.path, self.rows, self.grid = path, rows, grid

    def __len__(self) -> int:
        return self.rows

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """Consecutive grids, `size` at a time (the last run shorter), in row order."""
        pa = _pyarrow()
        reader = pa.parquet.ParquetFile(self.path)
        for batch in reader.iter_batches(batch_size=size, columns=["codes", "height", "width"]):
            heights, widths = batch.column(1).to_numpy(), batch.column(2).to_numpy()
            if len(batch) and not ((heights == self.grid[0]).all() and (widths == self.grid[1]).all()):
                raise VqtoolError(f"rows with grids other than {self.grid[0]}x{self.grid[1]}", self.path)
            flat = batch.column(0).flatten().to_numpy(zero_copy_only=False)
            if flat.size != len(batch) * self.grid[0] * self.grid[1]:
                raise VqtoolError("a row's codes do not fill its height x width", self.path)
            yield flat.reshape(len(batch), *self.grid)


def read_codes_parquet(path: Path) -> tuple[ParquetCodes, CodesSidecar]:
    """A codes.parquet's grids (read lazily) and the sidecar its metadata holds, its `files` the key column."""
    pa = _pyarrow()
    try:
        reader = pa.parquet.ParquetFile(path)
    except FileNotFoundError:
        raise VqtoolError("no such codes file", path) from None
    except Exception as exc:  # ArrowInvalid and the like: not a Parquet file, or a damaged one
        raise VqtoolError(f"not a readable Parquet codes file ({first_line(exc)})", path) from None
    raw_metadata = (reader.schema_arrow.metadata or {}).get(METADATA_KEY)
    if raw_metadata is None:
        raise VqtoolError("has no vqtool.codes metadata: it was not written by vqtool encode", path)
    try:
        raw = json.loads(raw_metadata)
        keys = reader.read(columns=["key"]).column(0).to_pylist()
        sidecar = sidecar_from({**raw, "files": [str(key) for key in keys]} if isinstance(raw, dict) else raw)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise VqtoolError(f"corrupt vqtool.codes metadata ({first_line(exc)})", path) from None
    except Exception as exc:  # pyarrow's errors reading the key column
        raise VqtoolError(f"unreadable key column ({first_line(exc)})", path) from None
    grid = (int(sidecar.grid[0]), int(sidecar.grid[1]))
    return ParquetCodes(path, len(sidecar.files), grid), sidecar
