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
from vqtool.formats.lock import output_lock
from vqtool.formats.manifest import LIVE_ACTIVATIONS, Manifest, activation_bytes, fitting_batch
from vqtool.formats.outputs import claim_decode_folder, finish_decode_folder
from vqtool.host import available_memory, worker_pool, writer_count
from vqtool.images.limits import DEFAULT_MAX_PIXELS
from vqtool.images.writing import clear_partial_pngs, write_pngs
from vqtool.precisions import FP32
from vqtool.runtime.base import Runner

WRITE_AHEAD = 2


@dataclass(frozen=True)
class DecodeResult:
    """What one decode of a codes file wrote: the folder of PNGs, how many, and what ran."""

    out_dir: Path
    count: int
    runtime: str
    seconds: float


# A source's stem in a PNG's name: at most this many bytes of UTF-8, so that no name nears a file system's limit of
# 255 bytes (a tar member's or a Parquet key's name can be longer than that).
STEM_BYTES = 100


def _name_part(source: str) -> str:
    """A source's file stem as part of a file name: control characters replaced, cut to STEM_BYTES bytes."""
    stem = "".join("_" if ord(char) < 32 or char == "\x7f" else char for char in Path(source).stem)
    return stem.encode("utf-8", "surrogateescape")[:STEM_BYTES].decode("utf-8", "ignore")  # a cut character dropped


def output_names(count: int, sources: list[str] | None) -> list[str]:
    """0001_cat.png ... when the sidecar names the sources, 0001.png ... otherwise."""
    width = max(4, len(str(count - 1)))
    if sources is None:
        return [f"{i:0{width}d}.png" for i in range(count)]
    return [f"{i:0{width}d}_{_name_part(s)}.png" for i, s in enumerate(sources)]


def check_decodable(
    manifest: Manifest, grid: tuple[int, int], precision: str, max_pixels: int, source: Path | str | None = None
) -> int:
    """The pixels of one image decoded from an h x w `grid`, after refusing grids whose images are larger than
    `max_pixels` or whose decoder would need more memory than the system has, each in one line."""
    factor = manifest.downsample
    height, width = grid[0] * factor, grid[1] * factor
    shape = f"{grid[0]}x{grid[1]} codes decode to {width}x{height} images"
    if height * width > max_pixels:
        raise VqtoolError(f"{shape}, over the limit of {max_pixels:,} pixels (--max-pixels)", source)
    need = activation_bytes(manifest, "decoder", precision, height * width) * LIVE_ACTIVATIONS
    free = available_memory()
    if free is not None and need > free:
        raise VqtoolError(
            f"{shape}, each needing about {need / 2**30:.1f} GiB of memory to decode, more than the "
            f"{free / 2**30:.1f} GiB available",
            source,
        )
    return height * width


def decode_file(
    codes_path: Path,
    manifest: Manifest,
    decoder: Runner,
    out_dir: Path,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodeResult:
    """Decode every grid in `codes_path` into `out_dir`; all input checks run before anything is written.

    `out_dir` must be empty or, with `overwrite`, hold an earlier decode (whose files this one does not rewrite are
    then removed; other files stay); no other run may write it meanwhile."""
    if batch_size < 1:
        raise VqtoolError(f"--batch-size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    count, sidecar, runs, grid = _open_codes(codes_path, manifest)
    pixels = check_decodable(manifest, grid, FP32, max_pixels, codes_path)
    batch_size = fitting_batch(manifest, "decoder", FP32, batch_size, pixels)  # FP32 sizes FP16 too, with room
    if sidecar is None:
        log(f"{codes_path}: no sidecar (codes.json) beside it, so these codes cannot be checked against the model")
    names = output_names(count, sidecar.files if sidecar else None)
    with output_lock(out_dir):
        stale = claim_decode_folder(out_dir, names, overwrite=overwrite)
        clear_partial_pngs(out_dir)
        _write_all(runs, decoder, out_dir, names, batch_size, writer_count(workers))
        finish_decode_folder(out_dir, names, stale)
    return DecodeResult(out_dir, count, decoder.describe(), time.perf_counter() - started)


def _write_all(
    runs: Callable[[int], Iterator[np.ndarray]],
    decoder: Runner,
    out_dir: Path,
    names: list[str],
    batch_size: int,
    workers: int,
) -> None:
    """Decode the grids a batch at a time while writer processes turn the images into PNG files."""
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


def _open_codes(
    path: Path, manifest: Manifest
) -> tuple[int, CodesSidecar | None, Callable[[int], Iterator[np.ndarray]], tuple[int, int]]:
    """How many grids a codes.npy or codes.parquet holds, its sidecar, its grids a batch at a time, and the grid's
    (h, w); checked."""
    if is_parquet(path):
        stored, sidecar = read_codes_parquet(path)
        check_codes(path, manifest, sidecar, len(stored), stored.batches(4096))
        return len(stored), sidecar, stored.batches, stored.grid
    codes, found = read_codes(path, manifest)
    grid = (int(codes.shape[1]), int(codes.shape[2]))
    return len(codes), found, lambda size: (codes[start : start + size] for start in range(0, len(codes), size)), grid
