"""Images -> codes.npy, streaming: files are decoded by reader processes while the graph runs.

Memory stays flat in the number of images: codes go straight into a memory-mapped .npy under a
temporary name, and only a few batches of pixels are ever in flight. Progress is recorded after
every batch, so an interrupted run continues with --resume; the final name only ever holds a
complete result.
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.atomic import StagedOutput, json_bytes, partial_path, usual_mode, write_json
from vqtool.codes import CodesSidecar, sidecar_path
from vqtool.cores import reader_count, shared_buffer, worker_buffer, worker_pool
from vqtool.errors import VqtoolError
from vqtool.images import SkippedFile, describe_skipped, fit_to_size, read_rgb
from vqtool.imagesets import read_npy_header
from vqtool.limits import DEFAULT_MAX_PIXELS
from vqtool.manifest import Manifest, code_dtype_for, manifest_checksum
from vqtool.runtime import Runner
from vqtool.shards import Shard, list_checksum

PREFETCH_BATCHES = 2
# Progress is made durable this often (and on interrupt), not per batch: each sync is an msync + fsync.
SYNC_SECONDS = 2.0


@dataclass(frozen=True)
class EncodeResult:
    """What one encode of image files wrote: the codes and their sidecar, how many rows, and what ran."""

    codes_path: Path
    sidecar_path: Path
    count: int
    grid: tuple[int, int]
    runtime: str
    resized: int
    seconds: float
    resumed_from: int
    # Files left out under --skip-bad (None without it); `count` is the rows written, files read.
    skipped: tuple[SkippedFile, ...] | None = None


class EncodeInterrupted(VqtoolError):
    """Stopped part way; the finished rows are kept for --resume."""

    exit_code = 130  # the shell's code for an interrupt, as train uses


def progress_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.progress.json")


@dataclass(frozen=True)
class ReadOptions:
    """How image files become model inputs, the same in every reader process."""

    size: int
    downsample: int = 16  # with --no-resize, sides must be multiples of it
    resize: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Leave unreadable files out (reported) instead of stopping at the first one.
    skip_bad: bool = False


def _load(path: str | Path, options: ReadOptions) -> tuple[np.ndarray, bool]:
    pixels = read_rgb(path, options.max_pixels)
    fitted = fit_to_size(pixels, options.size, resize=options.resize, multiple=options.downsample, path=path)
    return fitted, fitted.shape != pixels.shape


@dataclass(frozen=True)
class Batch:
    """One batch as read: `pixels` holds the files that were read, in order; `skipped` the others."""

    first: int  # index of the batch's first file in the list
    files: int  # files this batch covers, read or skipped
    pixels: np.ndarray
    resized: int
    skipped: tuple[SkippedFile, ...]


def _slot(buffer: mmap.mmap, offset: int, rows: int, shape: tuple[int, int]) -> np.ndarray:
    """rows x H x W x 3 uint8 pixels in the shared buffer, starting `offset` bytes in."""
    return np.frombuffer(buffer, np.uint8, rows * shape[0] * shape[1] * 3, offset).reshape(rows, *shape, 3)


def _decode_files(
    rows: np.ndarray, first: int, paths: list[str], options: ReadOptions, shape: tuple[int, int]
) -> Batch:
    """Decode `paths` into the leading rows of `rows`; the Batch's `pixels` are those rows, the files read."""
    resized, kept, skipped = 0, 0, []
    for name in paths:
        try:
            image, was_resized = _load(name, options)
            if image.shape[:2] != shape:
                raise VqtoolError(
                    f"is {image.shape[1]}x{image.shape[0]} but earlier images are {shape[1]}x{shape[0]}; "
                    "with --no-resize all images must share one size",
                    name,
                )
        except VqtoolError as error:
            if not options.skip_bad:
                raise
            skipped.append(SkippedFile.of(error, name))
            continue
        rows[kept] = image
        kept += 1
        resized += was_resized
    return Batch(first, len(paths), rows[:kept], resized, tuple(skipped))


def _load_batch(
    first: int, paths: list[str], options: ReadOptions, shape: tuple[int, int], offset: int | None = None
) -> Batch:
    """One part of a batch decoded in a reader process: into the shared buffer at `offset` (then `pixels` comes
    back empty, with the row count its only content), or, without one, into an array returned pickled."""
    if offset is None:
        return _decode_files(np.empty((len(paths), *shape, 3), np.uint8), first, paths, options, shape)
    batch = _decode_files(_slot(worker_buffer(), offset, len(paths), shape), first, paths, options, shape)
    return Batch(first, batch.files, np.empty((len(batch.pixels), 0, 0, 0), np.uint8), batch.resized, batch.skipped)


def read_batches(
    files: Sequence[str | Path],
    options: ReadOptions,
    batch_size: int,
    workers: int,
    shape: tuple[int, int],
    start: int = 0,
) -> Iterator[Batch]:
    """Batches of decoded files, in order, read ahead by reader processes.

    Processes, not threads: for small images per-file Python work dominates and holds the GIL, so
    threads measured slower than one thread; processes scale for small and large images alike.
    Each batch is split between the readers, so the first arrives after 1/readers of its decoding
    time, and inference waiting for a batch waits for all readers, not for one. Where workers are forked
    they decode into slots of a shared buffer, and a batch's `pixels` is a view of its slot, valid until
    the next batch is asked for. Measured with 10,000 32x32 PNGs on 2 cores (AMD EPYC), INT8 folder
    encode: pickling the pixels back cost the parent 5 µs an image, a sixth of inference.
    """
    in_flight = workers + PREFETCH_BATCHES
    row_bytes = shape[0] * shape[1] * 3
    # One slot more than batches in flight: the one the caller holds while the others are read.
    shared = shared_buffer(batch_size * row_bytes * (in_flight + 1))
    free = deque(range(in_flight + 1))
    starts = iter(range(start, len(files), batch_size))
    pool = worker_pool(workers, shared)
    pending: deque[tuple[int, list[Future[Batch]]]] = deque()

    def submit_next() -> None:
        first = next(starts, None)
        if first is None:
            return
        names = [str(f) for f in files[first : first + batch_size]]
        slot, parts = free.popleft(), []
        step = -(-len(names) // workers)
        for begin in range(0, len(names), step):
            offset = (slot * batch_size + begin) * row_bytes if shared is not None else None
            parts.append(pool.submit(_load_batch, first + begin, names[begin : begin + step], options, shape, offset))
        pending.append((slot, parts))

    try:
        for _ in range(in_flight):
            submit_next()
        while pending:
            slot, futures = pending.popleft()
            yield _joined([future.result() for future in futures], shared, slot * batch_size, shape)
            free.append(slot)
            submit_next()
    finally:
        # Not waiting for the readers to exit lets the caller finish its output meanwhile; none has work left
        # unless the caller stopped early, and then they stop after their current part.
        pool.shutdown(wait=False, cancel_futures=True)


def _joined(parts: list[Batch], shared: mmap.mmap | None, slot_row: int, shape: tuple[int, int]) -> Batch:
    """One batch from the parts its readers decoded; in the shared buffer, rows after a skipped file move up."""
    kept = sum(len(part.pixels) for part in parts)
    if shared is None:
        pixels = np.concatenate([part.pixels for part in parts])
    else:
        row_bytes = shape[0] * shape[1] * 3
        pixels = _slot(shared, slot_row * row_bytes, sum(part.files for part in parts), shape)
        row = 0
        for part in parts:
            here = part.first - parts[0].first
            if here != row:
                pixels[row : row + len(part.pixels)] = pixels[here : here + len(part.pixels)]
            row += len(part.pixels)
        pixels = pixels[:kept]
    return Batch(
        parts[0].first,
        sum(part.files for part in parts),
        pixels,
        sum(part.resized for part in parts),
        tuple(skip for part in parts for skip in part.skipped),
    )


def _first_shape(files: Sequence[str | Path], options: ReadOptions) -> tuple[int, int]:
    """The size every image is brought to: the model's, or with --no-resize the first readable file's."""
    if options.resize:
        return options.size, options.size
    for name in files:
        try:
            height, width = _load(name, options)[0].shape[:2]
            return height, width
        except VqtoolError:
            if not options.skip_bad:
                raise
    raise VqtoolError(f"none of the {len(files)} files could be read")


@dataclass(frozen=True)
class Progress:
    """How far an interrupted run got: files consumed, rows written, files skipped on the way."""

    done: int = 0
    written: int = 0
    skipped: tuple[SkippedFile, ...] = ()


def _resume_point(out: Path, signature: dict[str, object], resume: bool, log: Callable[[str], None]) -> Progress:
    """Where an interrupted run with the same files, model and options stopped, or the start."""
    partial, progress = partial_path(out), progress_path(out)
    if not (partial.exists() and progress.exists()):
        if resume:
            log(f"nothing to resume for {out}; starting from the first image")
        return Progress()
    if not resume:
        log(f"{out}: an interrupted earlier run left partial results; starting over (use --resume to continue it)")
        return Progress()
    try:
        saved = json.loads(progress.read_text())
        if {k: saved.get(k) for k in signature} != signature:
            raise VqtoolError(
                "the interrupted run encoded other files or used another model; rerun without --resume", out
            )
        done = int(saved["done"])
        return Progress(
            done,
            int(saved.get("written", done)),
            tuple(SkippedFile(str(s["file"]), str(s["reason"])) for s in saved.get("skipped", [])),
        )
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError):
        raise VqtoolError("progress record is corrupt; rerun without --resume", progress) from None


def shrink_rows(path: Path, rows: int) -> None:
    """Cut a C-order .npy to its first `rows` rows in place: rewrite the shape in the header, truncate the data.

    Used when --skip-bad left rows unused at the end; copying the codes instead would cost a pass over them.
    NumPy pads headers so that the row count can change in place, and writing the header through NumPy
    gives the bytes a fresh np.save would: shards merged later match a single pass byte for byte.
    """
    with open(path, "r+b") as handle:
        version, shape, fortran, dtype = read_npy_header(handle)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{path}: .npy format {version} is not one open_memmap writes")
        one = version == (1, 0)
        offset = handle.tell()
        header = io.BytesIO()
        fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, *shape[1:])}
        (np.lib.format.write_array_header_1_0 if one else np.lib.format.write_array_header_2_0)(header, fields)
        if fortran or len(header.getvalue()) != offset:
            raise ValueError(f"{path}: cannot rewrite this header in place")
        handle.seek(0)
        handle.write(header.getvalue())
        handle.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


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
    max_pixels: int = DEFAULT_MAX_PIXELS,
    skip_bad: bool = False,
    log: Callable[[str], None] = print,
) -> EncodeResult:
    """Encode the sorted `files` (or one shard of them) into `out` plus its sidecar.

    With `skip_bad`, files that cannot be read (or are larger than `max_pixels`) are left out: the
    codes hold a row per file read, and the sidecar lists those files and, under "skipped", the others.
    """
    if not files:
        raise VqtoolError("no images to encode")
    if batch_size < 1:
        raise VqtoolError(f"--batch-size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    workers = reader_count(workers)
    dtype = code_dtype_for(manifest.codes)
    options = ReadOptions(manifest.image_size, manifest.downsample, resize, max_pixels, skip_bad)
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
    shape = _first_shape(files, options)
    grid = (shape[0] // manifest.downsample, shape[1] // manifest.downsample)
    signature = {
        "list_sha256": list_checksum(files),
        "manifest_sha256": manifest_checksum(export_dir),
        "rows": len(files),
        "grid": list(grid),
        "dtype": dtype.name,
        "precision": precision,
        "skip_bad": skip_bad,
        "max_pixels": max_pixels,
    }
    progress = _resume_point(out, signature, resume, log)
    partial = partial_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress.done:
        codes_out = np.lib.format.open_memmap(partial, mode="r+")
        log(f"resuming {out} after {progress.done} of {len(files)} images")
    else:
        progress_path(out).unlink(missing_ok=True)
        codes_out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(len(files), *grid))
    resized = 0
    finished, written, skipped = progress.done, progress.written, list(progress.skipped)
    synced_at = time.monotonic()

    def sidecar_of(left_out: list[SkippedFile]) -> CodesSidecar:
        names = {s.file for s in left_out}
        return CodesSidecar(
            files=[str(f) for f in files if str(f) not in names],
            grid=list(grid),
            codes=manifest.codes,
            dtype=dtype.name,
            manifest_sha256=str(signature["manifest_sha256"]),
            checkpoint_sha256=manifest.checkpoint_sha256,
            shard=shard_info,
            precision=precision,
            skipped=[s.to_dict() for s in left_out] if skip_bad else None,
            backend=encoder.backend,
        )

    def record_progress(rows: np.memmap) -> None:
        """Rows on disk first, then the record that says so; at most every SYNC_SECONDS, and on interrupt."""
        rows.flush()
        record = {**signature, "done": finished, "written": written, "skipped": [s.to_dict() for s in skipped]}
        write_json(progress_path(out), record)

    # Without --skip-bad the sidecar is known before the first image is read (a file that cannot be read stops
    # the run), so it is written and synced while the images are encoded, and only renamed into place at the end.
    early_sidecar = None if skip_bad else StagedOutput(sidecar_path(out), lambda: json_bytes(sidecar_of([]).to_dict()))
    with early_sidecar or contextlib.nullcontext():
        try:
            for batch in read_batches(files, options, batch_size, workers, shape, start=progress.done):
                resized += batch.resized
                if len(batch.pixels):
                    codes_out[written : written + len(batch.pixels)] = encoder(batch.pixels)
                written += len(batch.pixels)
                skipped.extend(batch.skipped)
                finished = batch.first + batch.files
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
        if not written:
            partial.unlink(missing_ok=True)
            progress_path(out).unlink(missing_ok=True)
            raise VqtoolError(
                f"none of the {len(files)} files could be read, so nothing was written: {skipped[0].reason}"
            )
        if written < len(files):
            shrink_rows(partial, written)
        # The sidecar is renamed into place before the codes: a crash between leaves old codes with a
        # sidecar whose file count no longer matches, which decode reports, never a silent mismatch.
        if early_sidecar is not None:
            early_sidecar.commit()
        else:
            write_json(sidecar_path(out), sidecar_of(skipped).to_dict())
        usual_mode(partial)
        os.replace(partial, out)
    progress_path(out).unlink(missing_ok=True)
    if skipped:
        log(describe_skipped(skipped, len(files)))
    if resized:
        keep = f"use --no-resize to keep sizes that are multiples of {manifest.downsample}"
        log(f"resized {resized} of {written} images to {options.size}x{options.size} ({keep})")
    seconds = time.perf_counter() - started
    return EncodeResult(
        out,
        sidecar_path(out),
        written,
        grid,
        encoder.describe(),
        resized,
        seconds,
        progress.done,
        tuple(skipped) if skip_bad else None,
    )
