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


def require_pyarrow(what: str) -> Any:
    """pyarrow with its Parquet module, or the one sentence naming the extra that installs it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401  (pa.parquet below)
    except ModuleNotFoundError:
        raise missing_extra(what, "pyarrow", "ray") from None
    return pa


def _pyarrow() -> Any:
    return require_pyarrow("codes.parquet")


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
            cells = batch.column(0).flatten()
            if cells.null_count:  # to_numpy would make them NaN in a float array
                raise VqtoolError("a row's codes hold empty (null) cells", self.path)
            flat = cells.to_numpy(zero_copy_only=False)
            if flat.size != len(batch) * self.grid[0] * self.grid[1]:
                raise VqtoolError("a row's codes do not fill its height x width", self.path)
            yield flat.reshape(len(batch), *self.grid)


def _check_columns(pa: Any, schema: Any, path: Path) -> None:
    """The columns decode reads, of the types vqtool writes: a float or text column is refused, never cast."""
    types = pa.types
    wanted = {"key": types.is_string, "height": types.is_integer, "width": types.is_integer}
    for name, is_wanted in wanted.items():
        if schema.get_field_index(name) < 0 or not is_wanted(schema.field(name).type):
            raise VqtoolError(f"has no {name} column of the type vqtool writes", path)
    codes = schema.field("codes").type if schema.get_field_index("codes") >= 0 else None
    if (
        codes is None
        or not (types.is_list(codes) or types.is_large_list(codes))
        or not types.is_integer(codes.value_type)
    ):
        raise VqtoolError(f"its codes column must hold lists of integers, not {codes}", path)


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
    _check_columns(pa, reader.schema_arrow, path)
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
