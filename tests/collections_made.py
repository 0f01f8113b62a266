"""The collection forms big pipelines read, made from a folder of image files: WebDataset tar shards, Parquet."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def sample_key(path: Path, root: Path) -> str:
    """The key a file gets in the shards and Parquet files made below: its path under root, without suffix."""
    return path.relative_to(root).with_suffix("").as_posix().replace("/", "_")


def write_tar_shards(files: Sequence[Path], root: Path, out: Path, per_shard: int) -> list[Path]:
    """img2dataset's layout: `KEY.jpg` (the file's own bytes and suffix) beside a `KEY.json` member, per shard."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(files), per_shard)):
        shards.append(out / f"part-{number:05d}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for path in files[start : start + per_shard]:
                key = sample_key(path, root)
                tar.add(path, arcname=f"{key}{path.suffix}")
                info = tarfile.TarInfo(f"{key}.json")
                data = b'{"caption": "a photograph"}'
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return shards


def write_parquet_files(
    files: Sequence[Path], root: Path, out: Path, per_file: int, *, image_column: str = "jpg", row_group: int = 7
) -> list[Path]:
    """img2dataset's Parquet layout: `key`, the image bytes under `image_column`, a caption; small row groups."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for number, start in enumerate(range(0, len(files), per_file)):
        part = files[start : start + per_file]
        table = pa.table(
            {
                "key": [sample_key(p, root) for p in part],
                image_column: [p.read_bytes() for p in part],
                "caption": ["a photograph"] * len(part),
            }
        )
        written.append(out / f"part-{number:05d}.parquet")
        pq.write_table(table, written[-1], row_group_size=row_group)
    return written
