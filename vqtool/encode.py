"""Images -> codes.npy, streaming: files are decoded by a thread pool while the graph runs.

Memory stays flat in the number of images: codes go straight into a memory-mapped .npy under a
temporary name, and only a few batches of pixels are ever in flight.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.atomic import atomic_output, write_json
from vqtool.codes import CodesSidecar, sidecar_path
from vqtool.errors import VqtoolError
from vqtool.images import fit_to_size, read_rgb
from vqtool.manifest import DOWNSAMPLE, Manifest, code_dtype_for, manifest_checksum
from vqtool.runtime import Runner

PREFETCH_BATCHES = 2


@dataclass(frozen=True)
class EncodeResult:
    codes_path: Path
    sidecar_path: Path
    count: int
    grid: tuple[int, int]
    runtime: str
    resized: int
    seconds: float


def _load(path: Path, size: int, resize: bool) -> tuple[np.ndarray, bool]:
    pixels = read_rgb(path)
    fitted = fit_to_size(pixels, size, resize=resize, multiple=DOWNSAMPLE, path=path)
    return fitted, fitted.shape != pixels.shape


def read_batches(
    files: Sequence[Path], size: int, resize: bool, batch_size: int, workers: int
) -> Iterator[tuple[int, list[tuple[np.ndarray, bool]]]]:
    """(start index, decoded images) per batch, keeping PREFETCH_BATCHES batches decoding ahead."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vqtool-read") as pool:
        pending: deque[tuple[int, list[Future[tuple[np.ndarray, bool]]]]] = deque()
        starts = iter(range(0, len(files), batch_size))

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                chunk = files[start : start + batch_size]
                pending.append((start, [pool.submit(_load, f, size, resize) for f in chunk]))

        for _ in range(PREFETCH_BATCHES + 1):
            submit_next()
        while pending:
            start, futures = pending.popleft()
            try:
                yield start, [f.result() for f in futures]
            except BaseException:
                for _, later in pending:
                    for future in later:
                        future.cancel()
                raise
            submit_next()


def encode_files(
    files: Sequence[Path],
    manifest: Manifest,
    export_dir: Path,
    encoder: Runner,
    out: Path,
    *,
    batch_size: int = 64,
    resize: bool = True,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> EncodeResult:
    """Encode `files` in order into `out` (N x h x w, smallest unsigned dtype) plus its sidecar."""
    if not files:
        raise VqtoolError("no images to encode")
    if batch_size < 1:
        raise VqtoolError(f"--batch-size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    workers = workers or min(8, (os.cpu_count() or 2) + 2)
    dtype = code_dtype_for(manifest.codes)
    size = manifest.image_size
    shape: tuple[int, int] | None = None
    resized = 0
    with atomic_output(out) as temp:
        codes_out: np.memmap | None = None
        for start, loaded in read_batches(files, size, resize, batch_size, workers):
            pixels = [p for p, _ in loaded]
            resized += sum(r for _, r in loaded)
            if shape is None:
                shape = pixels[0].shape[:2]
                grid = (shape[0] // DOWNSAMPLE, shape[1] // DOWNSAMPLE)
                codes_out = np.lib.format.open_memmap(temp, mode="w+", dtype=dtype, shape=(len(files), *grid))
            for offset, p in enumerate(pixels):
                if p.shape[:2] != shape:
                    raise VqtoolError(
                        f"is {p.shape[1]}x{p.shape[0]} but earlier images are {shape[1]}x{shape[0]}; "
                        "with --no-resize all images must share one size",
                        files[start + offset],
                    )
            assert codes_out is not None
            codes_out[start : start + len(pixels)] = encoder(np.stack(pixels))
        assert codes_out is not None and shape is not None
        codes_out.flush()
        del codes_out
        sidecar = CodesSidecar(
            files=[str(f) for f in files],
            grid=list(grid),
            codes=manifest.codes,
            dtype=dtype.name,
            manifest_sha256=manifest_checksum(export_dir),
            checkpoint_sha256=manifest.checkpoint_sha256,
        )
        # The sidecar is renamed into place before the codes: a crash between leaves old codes with a
        # sidecar whose file count no longer matches, which decode reports, never a silent mismatch.
        write_json(sidecar_path(out), sidecar.to_dict())
    if resized:
        keep = "use --no-resize to keep sizes that are multiples of 16"
        log(f"resized {resized} of {len(files)} images to {size}x{size} ({keep})")
    return EncodeResult(
        out, sidecar_path(out), len(files), grid, encoder.describe(), resized, time.perf_counter() - started
    )
