"""Images -> codes.npy, streaming: files are decoded by reader processes while the graph runs.

Memory stays flat in the number of images: codes go straight into a memory-mapped .npy under a
temporary name, and only a few batches of pixels are ever in flight. Progress is recorded after
every batch, so an interrupted run continues with --resume; the final name only ever holds a
complete result.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.atomic import partial_path, usual_mode, write_json
from vqtool.codes import CodesSidecar, sidecar_path
from vqtool.cores import reader_count, worker_pool
from vqtool.errors import VqtoolError
from vqtool.images import fit_to_size, read_rgb
from vqtool.manifest import DOWNSAMPLE, Manifest, code_dtype_for, manifest_checksum
from vqtool.runtime import Runner
from vqtool.shards import Shard, list_checksum

PREFETCH_BATCHES = 2
# Progress is made durable this often (and on interrupt), not per batch: each sync is an msync + fsync.
SYNC_SECONDS = 2.0


@dataclass(frozen=True)
class EncodeResult:
    codes_path: Path
    sidecar_path: Path
    count: int
    grid: tuple[int, int]
    runtime: str
    resized: int
    seconds: float
    resumed_from: int


class EncodeInterrupted(VqtoolError):
    """Stopped part way; the finished rows are kept for --resume."""

    exit_code = 130  # the shell's code for an interrupt, as train uses


def progress_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.progress.json")


def _load(path: str | Path, size: int, resize: bool) -> tuple[np.ndarray, bool]:
    pixels = read_rgb(path)
    fitted = fit_to_size(pixels, size, resize=resize, multiple=DOWNSAMPLE, path=path)
    return fitted, fitted.shape != pixels.shape


def _load_batch(paths: list[str], size: int, resize: bool, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """One batch decoded in a reader process: stacked pixels and how many were resized."""
    pixels = np.empty((len(paths), *shape, 3), dtype=np.uint8)
    resized = 0
    for index, name in enumerate(paths):
        image, was_resized = _load(name, size, resize)
        if image.shape[:2] != shape:
            raise VqtoolError(
                f"is {image.shape[1]}x{image.shape[0]} but earlier images are {shape[1]}x{shape[0]}; "
                "with --no-resize all images must share one size",
                name,
            )
        pixels[index] = image
        resized += was_resized
    return pixels, resized


def read_batches(
    files: Sequence[str | Path],
    size: int,
    resize: bool,
    batch_size: int,
    workers: int,
    shape: tuple[int, int],
    start: int = 0,
) -> Iterator[tuple[int, np.ndarray, int]]:
    """(start index, pixels N x H x W x 3, resized count) per batch, decoded ahead by reader processes.

    Processes, not threads: for small images per-file Python work dominates and holds the GIL, so
    threads measured slower than one thread; processes scale for small and large images alike.
    """
    with worker_pool(workers) as pool:
        pending: deque[tuple[int, Future[tuple[np.ndarray, int]]]] = deque()
        starts = iter(range(start, len(files), batch_size))

        def submit_next() -> None:
            first = next(starts, None)
            if first is not None:
                names = [str(f) for f in files[first : first + batch_size]]
                pending.append((first, pool.submit(_load_batch, names, size, resize, shape)))

        for _ in range(workers + PREFETCH_BATCHES):
            submit_next()
        try:
            while pending:
                first, future = pending.popleft()
                pixels, resized = future.result()
                yield first, pixels, resized
                submit_next()
        finally:
            for _, later in pending:
                later.cancel()


def _first_shape(path: Path, size: int, resize: bool) -> tuple[int, int]:
    height, width = _load(path, size, resize)[0].shape[:2]
    return height, width


def _resume_point(out: Path, signature: dict[str, object], resume: bool, log: Callable[[str], None]) -> int:
    """Rows already encoded by an interrupted run with the same files and model, or 0 to start afresh."""
    partial, progress = partial_path(out), progress_path(out)
    if not (partial.exists() and progress.exists()):
        if resume:
            log(f"nothing to resume for {out}; starting from the first image")
        return 0
    if not resume:
        log(f"{out}: an interrupted earlier run left partial results; starting over (use --resume to continue it)")
        return 0
    try:
        saved = json.loads(progress.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VqtoolError("progress record is corrupt; rerun without --resume", progress) from None
    if {k: saved.get(k) for k in signature} != signature:
        raise VqtoolError("the interrupted run encoded other files or used another model; rerun without --resume", out)
    return int(saved["done"])


def encode_files(
    files: Sequence[str | Path],
    manifest: Manifest,
    export_dir: Path,
    encoder: Runner,
    out: Path,
    *,
    batch_size: int = 64,
    resize: bool = True,
    shard: Shard | None = None,
    resume: bool = False,
    workers: int | None = None,
    precision: str = "fp32",
    log: Callable[[str], None] = print,
) -> EncodeResult:
    """Encode the sorted `files` (or one shard of them) into `out` plus its sidecar."""
    if not files:
        raise VqtoolError("no images to encode")
    if batch_size < 1:
        raise VqtoolError(f"--batch-size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    workers = reader_count(workers)
    dtype = code_dtype_for(manifest.codes)
    size = manifest.image_size
    shard_info: dict[str, int | str] | None = None
    if shard is not None:
        begin, stop = shard.bounds(len(files))
        shard_info = {
            "index": shard.index,
            "count": shard.count,
            "start": begin,
            "stop": stop,
            "total": len(files),
            "list_sha256": list_checksum(files),
        }
        files = files[begin:stop]
        if not files:
            raise VqtoolError(f"shard {shard.index}/{shard.count} of {shard_info['total']} files is empty")
    shape = _first_shape(Path(files[0]), size, resize)
    grid = (shape[0] // DOWNSAMPLE, shape[1] // DOWNSAMPLE)
    signature = {
        "list_sha256": list_checksum(files),
        "manifest_sha256": manifest_checksum(export_dir),
        "rows": len(files),
        "grid": list(grid),
        "dtype": dtype.name,
        "precision": precision,
    }
    done = _resume_point(out, signature, resume, log)
    partial = partial_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if done:
        codes_out = np.lib.format.open_memmap(partial, mode="r+")
        log(f"resuming {out} after {done} of {len(files)} images")
    else:
        progress_path(out).unlink(missing_ok=True)
        codes_out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(len(files), *grid))
    resized = 0
    finished, synced_at = done, time.monotonic()

    def record_progress(rows: np.memmap) -> None:
        """Rows on disk first, then the record that says so; at most every SYNC_SECONDS, and on interrupt."""
        rows.flush()
        write_json(progress_path(out), {**signature, "done": finished})

    try:
        for first, pixels, count in read_batches(files, size, resize, batch_size, workers, shape, start=done):
            resized += count
            codes_out[first : first + len(pixels)] = encoder(pixels)
            finished = first + len(pixels)
            if time.monotonic() - synced_at > SYNC_SECONDS:
                record_progress(codes_out)
                synced_at = time.monotonic()
    except VqtoolError:
        # Bad input changes the file list, so these rows could never be resumed: drop them.
        del codes_out
        partial.unlink(missing_ok=True)
        progress_path(out).unlink(missing_ok=True)
        raise
    except KeyboardInterrupt:
        record_progress(codes_out)
        raise EncodeInterrupted(
            f"interrupted after {finished} of {len(files)} images; the finished rows are kept: "
            "run the same command with --resume to continue",
            out,
        ) from None
    codes_out.flush()
    del codes_out
    sidecar = CodesSidecar(
        files=[str(f) for f in files],
        grid=list(grid),
        codes=manifest.codes,
        dtype=dtype.name,
        manifest_sha256=str(signature["manifest_sha256"]),
        checkpoint_sha256=manifest.checkpoint_sha256,
        shard=shard_info,
        precision=precision,
    )
    # The sidecar is renamed into place before the codes: a crash between leaves old codes with a
    # sidecar whose file count no longer matches, which decode reports, never a silent mismatch.
    write_json(sidecar_path(out), sidecar.to_dict())
    usual_mode(partial)
    os.replace(partial, out)
    progress_path(out).unlink(missing_ok=True)
    if resized:
        keep = "use --no-resize to keep sizes that are multiples of 16"
        log(f"resized {resized} of {len(files)} images to {size}x{size} ({keep})")
    return EncodeResult(
        out, sidecar_path(out), len(files), grid, encoder.describe(), resized, time.perf_counter() - started, done
    )
