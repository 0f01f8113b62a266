"""codes.npy -> one PNG per code grid; writer processes encode PNGs while the decoder graph runs."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.errors import VqtoolError
from vqtool.formats.codes import CodesSidecar, check_codes, read_codes
from vqtool.formats.codes_parquet import is_parquet, read_codes_parquet
from vqtool.formats.manifest import Manifest, fitting_batch
from vqtool.images.writing import write_pngs
from vqtool.runtime.base import Runner
from vqtool.runtime.workers import worker_pool, writer_count

WRITE_AHEAD = 2


@dataclass(frozen=True)
class DecodeResult:
    """What one decode of a codes file wrote: the folder of PNGs, how many, and what ran."""

    out_dir: Path
    count: int
    runtime: str
    seconds: float


def output_names(count: int, sources: list[str] | None) -> list[str]:
    """0001_cat.png ... when the sidecar names the sources, 0001.png ... otherwise."""
    width = max(4, len(str(count - 1)))
    if sources is None:
        return [f"{i:0{width}d}.png" for i in range(count)]
    return [f"{i:0{width}d}_{Path(s).stem}.png" for i, s in enumerate(sources)]


def decode_file(
    codes_path: Path,
    manifest: Manifest,
    decoder: Runner,
    out_dir: Path,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> DecodeResult:
    """Decode every grid in `codes_path` into `out_dir`; all input checks run before anything is written."""
    if batch_size < 1:
        raise VqtoolError(f"--batch-size must be at least 1, got {batch_size}")
    batch_size = fitting_batch(manifest, "decoder", "fp32", batch_size)  # FP32 sizes FP16 too, with room
    started = time.perf_counter()
    count, sidecar, runs = _open_codes(codes_path, manifest)
    if sidecar is None:
        log(f"{codes_path}: no sidecar (codes.json) beside it, so these codes cannot be checked against the model")
    if out_dir.exists() and not out_dir.is_dir():
        raise VqtoolError("exists and is not a folder", out_dir)
    names = output_names(count, sidecar.files if sidecar else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = writer_count(workers)
    # Processes, not threads: PNG encoding of small images is mostly Python work under the GIL, which
    # threads would take turns on.
    with worker_pool(workers) as pool:
        # At most WRITE_AHEAD batches per writer in flight: memory stays flat however many grids there are.
        pending: deque[Future[None]] = deque()
        start = 0
        for grids in runs(batch_size):
            images = decoder(np.ascontiguousarray(grids, dtype=np.int32))
            pending.append(pool.submit(write_pngs, out_dir, names[start : start + len(images)], images))
            start += len(images)
            while len(pending) > WRITE_AHEAD * workers:
                pending.popleft().result()
        for future in pending:
            future.result()
    return DecodeResult(out_dir, count, decoder.describe(), time.perf_counter() - started)


def _open_codes(
    path: Path, manifest: Manifest
) -> tuple[int, CodesSidecar | None, Callable[[int], Iterator[np.ndarray]]]:
    """How many grids a codes.npy or codes.parquet holds, its sidecar, and its grids a batch at a time; checked."""
    if is_parquet(path):
        stored, sidecar = read_codes_parquet(path)
        check_codes(path, manifest, sidecar, len(stored), stored.batches(4096))
        return len(stored), sidecar, stored.batches
    codes, found = read_codes(path, manifest)
    return len(codes), found, lambda size: (codes[start : start + size] for start in range(0, len(codes), size))
