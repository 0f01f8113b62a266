"""Image files -> batches of model inputs, decoded ahead by reader processes while the graph runs."""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from vqtool.data import ImageRef, ImageSet, ref_name, ref_pixels
from vqtool.errors import VqtoolError
from vqtool.host import shared_buffer, worker_buffer, worker_pool
from vqtool.images.fit import Fit
from vqtool.images.reading import SkippedFile, read_each

PREFETCH_BATCHES = 2


@dataclass(frozen=True)
class ReadOptions:
    """How image files become model inputs, the same in every reader process."""

    size: int
    downsample: int = 16  # kept as they are (Fit's keep), sides must be multiples of it
    fit: Fit = Fit()
    # Leave unreadable files out (reported) instead of stopping at the first one.
    skip_bad: bool = False


def _load(ref: ImageRef, options: ReadOptions) -> tuple[np.ndarray, bool]:
    pixels = ref_pixels(ref, options.fit.max_pixels)
    fitted = options.fit.apply(pixels, options.size, options.downsample, ref_name(ref))
    return fitted, fitted.shape != pixels.shape


def fitted_image(load: ImageRef, options: ReadOptions, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """One image brought to `shape` (the model's size, or with --no-resize the first image's), and whether it was
    resized; a one-line VqtoolError naming it if it cannot be read or, kept as it is, has another size."""
    image, was_resized = _load(load, options)
    if image.shape[:2] != shape:
        raise VqtoolError(
            f"is {image.shape[1]}x{image.shape[0]} but earlier images are {shape[1]}x{shape[0]}; "
            "with --no-resize all images must share one size",
            ref_name(load),
        )
    return image, was_resized


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
    rows: np.ndarray, first: int, paths: list[ImageRef], options: ReadOptions, shape: tuple[int, int]
) -> Batch:
    """Decode `paths` into the leading rows of `rows`; the Batch's `pixels` are those rows, the files read."""

    def load(item: ImageRef) -> tuple[np.ndarray, bool]:
        return fitted_image(item, options, shape)

    resized, kept, skipped = 0, 0, list[SkippedFile]()
    skipping = skipped if options.skip_bad else None
    for _, (image, was_resized) in read_each(paths, load, skipping, file_of=ref_name):
        rows[kept] = image
        kept += 1
        resized += was_resized
    return Batch(first, len(paths), rows[:kept], resized, tuple(skipped))


def _load_batch(
    first: int, paths: list[ImageRef], options: ReadOptions, shape: tuple[int, int], offset: int | None = None
) -> Batch:
    """One part of a batch decoded in a reader process: into the shared buffer at `offset` (then `pixels` comes
    back empty, with the row count its only content), or, without one, into an array returned pickled."""
    if offset is None:
        return _decode_files(np.empty((len(paths), *shape, 3), np.uint8), first, paths, options, shape)
    batch = _decode_files(_slot(worker_buffer(), offset, len(paths), shape), first, paths, options, shape)
    return Batch(first, batch.files, np.empty((len(batch.pixels), 0, 0, 0), np.uint8), batch.resized, batch.skipped)


def read_batches(
    images: ImageSet,
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
    the next batch is asked for: pickling the pixels back would cost the parent a sizeable share of INT8
    inference's time.
    """
    total = len(images.keys)
    in_flight = workers + PREFETCH_BATCHES
    row_bytes = shape[0] * shape[1] * 3
    # One slot more than batches in flight: the one the caller holds while the others are read.
    shared = shared_buffer(batch_size * row_bytes * (in_flight + 1))
    free = deque(range(in_flight + 1))
    starts = iter(range(start, total, batch_size))
    pool = worker_pool(workers, shared)
    pending: deque[tuple[int, list[Future[Batch]]]] = deque()

    def submit_next() -> None:
        first = next(starts, None)
        if first is None:
            return
        names = images.refs(first, first + batch_size)
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
    except BaseException:
        # A run that ends in an error or an interrupt waits for its readers to stop: a process that exits while
        # the pool's manager thread still runs can hit its closed wake-up pipe at exit (CPython 3.11), and print
        # a traceback after the one-line error.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    # Not waiting for the readers to exit lets the caller finish its output meanwhile: none has work left.
    pool.shutdown(wait=False)


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


def first_shape(images: ImageSet, options: ReadOptions) -> tuple[int, int]:
    """The size every image is brought to: the model's, or with --no-resize the first readable file's."""
    if options.fit.resizes:
        return options.size, options.size
    total = len(images.keys)
    for start in range(0, total, 64):
        loads = images.refs(start, start + 64)
        for _, (image, _) in read_each(loads, lambda item: _load(item, options), [] if options.skip_bad else None):
            height, width = image.shape[:2]
            return height, width
    raise VqtoolError(f"none of the {total} files could be read")
