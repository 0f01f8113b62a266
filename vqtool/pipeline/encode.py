"""Images -> codes.npy (or codes.parquet), streaming: files are decoded by reader processes while the graph runs.

Memory stays flat in the number of images: codes go straight into a memory-mapped .npy under a
temporary name, and only a few batches of pixels are ever in flight. Progress is recorded as the
run goes, so an interrupted run continues with --resume; the final name only ever holds a
complete result. Three steps: `plan_encode` checks everything it can before any work, `run_encode`
encodes the batches into the partial file, and finishing puts the result in place (a codes.parquet is written
from the finished partial rows, so it resumes the same way).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from vqtool.data import ImageSet
from vqtool.errors import VqtoolError
from vqtool.formats.atomic import StagedOutput, json_bytes, partial_path, usual_mode, write_json
from vqtool.formats.codes import CodesSidecar, sidecar_path
from vqtool.formats.codes_parquet import is_parquet, require_pyarrow, write_codes_parquet
from vqtool.formats.contract import Contract, contract_of
from vqtool.formats.lock import output_lock
from vqtool.formats.manifest import Manifest, code_dtype_for, fitting_batch, manifest_checksum
from vqtool.formats.outputs import check_codes_name, check_codes_output
from vqtool.formats.space import allocated_memmap, reserve, writable_npy
from vqtool.host import reader_count
from vqtool.images.fit import CENTER, Fit
from vqtool.images.limits import DEFAULT_MAX_PIXELS
from vqtool.images.reading import SkippedFile, describe_skipped
from vqtool.pipeline.reading import ReadOptions, first_shape, read_batches
from vqtool.pipeline.resume import Progress, progress_path, resume_point, shrink_rows
from vqtool.pipeline.shards import Shard, list_checksum
from vqtool.precisions import EXACT_CONTRACT, FP32
from vqtool.runtime.base import Runner

# Progress is made durable this often (and on interrupt), not per batch: each sync is an msync + fsync.
SYNC_SECONDS = 2.0


@dataclass(frozen=True)
class EncodeResult:
    """What one encode of image files wrote: the codes and their sidecar, how many rows, and what ran."""

    codes_path: Path
    sidecar_path: Path  # for a codes.parquet, the file itself (its metadata holds the sidecar)
    count: int
    grid: tuple[int, int]
    runtime: str
    resized: int
    seconds: float
    resumed_from: int
    # Files left out under --skip-bad (None without it); `count` is the rows written, files read.
    skipped: tuple[SkippedFile, ...] | None = None
    contract: Contract | None = None  # the contract the codes were made under, as their sidecar records it


class EncodeInterrupted(VqtoolError):
    """Stopped part way; the finished rows are kept for --resume."""

    exit_code = 130  # the shell's code for an interrupt, as train uses


def interrupt_on_sigterm(signum: int, frame: object) -> None:
    """A SIGTERM handler for an encode: schedulers preempt with SIGTERM, and as an interrupt the run keeps the
    rows it finished for --resume instead of dying with them."""
    raise KeyboardInterrupt


@dataclass(frozen=True)
class EncodePlan:
    """One encode, checked before any work: the files (of the shard), the options, and what the output will hold."""

    images: ImageSet  # the images of the shard, in row order
    out: Path
    options: ReadOptions
    shape: tuple[int, int]  # the size every image is brought to
    grid: tuple[int, int]
    dtype: np.dtype
    batch_size: int
    workers: int
    manifest: Manifest
    precision: str
    shard: dict[str, int | str] | None
    # What a resumed run must share with the interrupted one.
    signature: dict[str, object]
    export_dir: Path
    # The contract the encoder runs under, where known before the run (the local engine); Ray's actors say theirs.
    contract: Contract | None = None

    def kept_keys(self, skipped: Sequence[SkippedFile]) -> list[str]:
        """The keys of the rows written: every image's but those skipped (named as messages name them)."""
        if not skipped:
            return list(self.images.keys)
        names = {s.file for s in skipped}
        keys = self.images.keys
        return [keys[i] for i in range(len(keys)) if self.images.name(i) not in names]

    def sidecar(self, contract: Contract, skipped: Sequence[SkippedFile]) -> CodesSidecar:
        return CodesSidecar(
            files=self.kept_keys(skipped),
            grid=list(self.grid),
            codes=self.manifest.codes,
            dtype=self.dtype.name,
            manifest_sha256=str(self.signature["manifest_sha256"]),
            checkpoint_sha256=self.manifest.checkpoint_sha256,
            shard=self.shard,
            precision=self.precision,
            skipped=[s.to_dict() for s in skipped] if self.options.skip_bad else None,
            backend=contract.backend,
            contract=contract.to_dict(),
        )


@contextlib.contextmanager
def codes_output(
    out: Path, *, overwrite: bool, resume: bool, left_behind: Callable[[Path], Sequence[Path]]
) -> Iterator[None]:
    """Hold `out` for the run (one writer per output), after checking that the run may write it: an existing output
    is replaced only with `overwrite`, or with `resume` where an interrupted run left `left_behind(out)` to
    continue. Both engines start here, before any work."""
    check_codes_name(out)
    with output_lock(out, sidecar_path(out), progress_path(out)):
        resuming = resume and all(path.exists() for path in left_behind(out))
        check_codes_output(out, overwrite=overwrite, resuming=resuming)
        if is_parquet(out):
            require_pyarrow("codes.parquet")  # now, not after the whole encode
        yield


@dataclass(frozen=True)
class EncodeOptions:
    """How an encode of files reads them and writes its output: the command's options, one value from the command
    line through the API to either engine."""

    batch_size: int = 64
    fit: Fit = Fit()
    shard: Shard | None = None  # this slice of the sorted list only (Slurm arrays; joined by merge)
    skip_bad: bool = False  # leave unreadable files out, and list them in the sidecar
    readers: int | None = None  # reader processes (default: one per core)
    resume: bool = False  # continue an interrupted run of the same output
    overwrite: bool = False  # replace an existing output
    # Parquet inputs: the column of image bytes, and the one that names each row (default: found by name).
    image_column: str | None = None
    key_column: str | None = None

    @classmethod
    def of(
        cls,
        *,
        resize: bool = True,
        crop: str = "resize",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        shard: str | Shard | None = None,
        **fields: Any,
    ) -> EncodeOptions:
        """The options the API's keywords and the command line's flags say (EncodeKeywords)."""
        chosen = Shard.parse(shard) if isinstance(shard, str) else shard
        return cls(fit=Fit.of(resize, crop, max_pixels), shard=chosen, **fields)


class EncodeKeywords(TypedDict, total=False):
    """EncodeOptions as the API's keywords take it (Tokenizer.encode_files): resize, crop and max_pixels make its
    Fit, and a shard may be given as "I/N"."""

    batch_size: int
    resize: bool
    crop: str
    max_pixels: int
    shard: str | Shard | None
    skip_bad: bool
    readers: int | None
    resume: bool
    overwrite: bool
    image_column: str | None
    key_column: str | None


def plan_encode(
    images: ImageSet,
    manifest: Manifest,
    export_dir: Path,
    out: Path,
    options: EncodeOptions = EncodeOptions(),
    precision: str = FP32,
    contract: Contract | None = None,
) -> EncodePlan:
    """Every check an encode can make before it reads an image: files, batch size, shard, the first size.

    `images`: the files, tar members or Parquet rows to encode, as vqtool.data.image_set gives them; `contract`:
    the one the encoder runs under where it is known before the run (a resumed run must share it)."""
    if not images.keys:
        raise VqtoolError("no images to encode")
    if options.batch_size < 1:
        raise VqtoolError(f"--batch-size must be at least 1, got {options.batch_size}")
    batch_size = fitting_batch(manifest, "encoder", precision, options.batch_size)
    shard, shard_info = options.shard, None
    if shard is not None:
        begin, stop = shard.bounds(len(images.keys))
        shard_info = shard.record(begin, stop, images.keys)
        images = images.sliced(begin, stop)
        if not images.keys:
            raise VqtoolError(f"shard {shard.index}/{shard.count} of {shard_info['total']} files is empty")
    reading = ReadOptions(manifest.image_size, manifest.downsample, options.fit, options.skip_bad)
    shape = first_shape(images, reading)
    grid = (shape[0] // manifest.downsample, shape[1] // manifest.downsample)
    dtype = code_dtype_for(manifest.codes)
    signature = {
        "list_sha256": list_checksum(images.keys),
        "manifest_sha256": manifest_checksum(export_dir),
        "rows": len(images.keys),
        "grid": list(grid),
        "dtype": dtype.name,
        "precision": precision,
        "skip_bad": options.skip_bad,
        "max_pixels": options.fit.max_pixels,
        # Only where it is not the default: progress records written before the option resume as they were.
        **({"crop": "center"} if options.fit.mode == CENTER else {}),
        # Only where it is not exact: exact codes are the same whichever runtime made them.
        **({"contract": contract.key} if contract is not None and contract.key != EXACT_CONTRACT else {}),
    }
    workers = reader_count(options.readers)
    return EncodePlan(
        images,
        out,
        reading,
        shape,
        grid,
        dtype,
        batch_size,
        workers,
        manifest,
        precision,
        shard_info,
        signature,
        export_dir,
        contract,
    )


def run_encode(
    plan: EncodePlan, encoder: Runner, *, resume: bool = False, log: Callable[[str], None] = print
) -> EncodeResult:
    """Encode the plan's files into its output plus sidecar, continuing an interrupted run with `resume`.

    With skip_bad, files that cannot be read (or are larger than max_pixels) are left out: the codes hold a
    row per file read, and the sidecar lists those files and, under "skipped", the others.
    """
    started = time.perf_counter()
    out, total = plan.out, len(plan.images.keys)
    contract = plan.contract or contract_of(plan.export_dir, encoder.backend, plan.precision, encoder.provider)
    if contract.backend != encoder.backend:
        raise ValueError(f"the plan was made for {contract.backend}'s contract, not for {encoder.backend}")
    progress = resume_point(out, plan.signature, resume, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress.done:
        codes_out = writable_npy(partial_path(out))
        if codes_out.shape != (total, *plan.grid) or codes_out.dtype != plan.dtype:
            raise VqtoolError(
                f"holds {codes_out.dtype} codes shaped {codes_out.shape}, not this run's {np.dtype(plan.dtype)} "
                f"{(total, *plan.grid)}; rerun without --resume",
                partial_path(out),
            )
        # Allocated when it was made; again in case that run's vqtool did not, since a page the disk cannot back
        # ends the process (SIGBUS) rather than raising.
        reserve(partial_path(out), int(codes_out.offset) + codes_out.nbytes, shown=out, what="the codes")
        log(f"resuming {out} after {progress.done} of {total} images")
    else:
        progress_path(out).unlink(missing_ok=True)
        codes_out = allocated_memmap(partial_path(out), plan.dtype, (total, *plan.grid), shown=out)
    # Without skip_bad the sidecar is known before the first image is read (a file that cannot be read stops
    # the run), so it is written and synced while the images are encoded, and only renamed into place at the end.
    early = None
    if not plan.options.skip_bad and not is_parquet(out):
        early = StagedOutput(sidecar_path(out), lambda: json_bytes(plan.sidecar(contract, []).to_dict()))
    with early or contextlib.nullcontext():
        done = _encode_batches(plan, encoder, codes_out, progress)
        del codes_out
        finish_codes(plan, contract, done.written, done.skipped, early)
    report_notes(plan, done.written, done.resized, done.skipped, log)
    return EncodeResult(
        out,
        written_sidecar(out),
        done.written,
        plan.grid,
        encoder.describe(),
        done.resized,
        time.perf_counter() - started,
        progress.done,
        tuple(done.skipped) if plan.options.skip_bad else None,
        contract,
    )


def written_sidecar(out: Path) -> Path:
    """Where an encode's sidecar is: codes.json beside a codes.npy; a codes.parquet holds its own."""
    return out if is_parquet(out) else sidecar_path(out)


def report_notes(
    plan: EncodePlan, written: int, resized: int, skipped: Sequence[SkippedFile], log: Callable[[str], None]
) -> None:
    """The lines an encode ends with, on either engine: the files skipped, and how many were resized."""
    if skipped:
        log(describe_skipped(skipped, len(plan.images.keys)))
    if resized:
        keep = f"use --no-resize to keep sizes that are multiples of {plan.manifest.downsample}"
        size = plan.options.size
        log(f"resized {resized} of {written} images to {size}x{size} ({keep})")


@dataclass(frozen=True)
class _Counts:
    """How far the batches got: files consumed, rows written, files resized and skipped.

    Frozen and replaced whole after each batch: an interrupt lands between two bytecodes, and a record that
    counted a batch's rows but not its files would make the resumed run write one row past the end.
    """

    finished: int
    written: int
    resized: int
    skipped: tuple[SkippedFile, ...]


def _encode_batches(plan: EncodePlan, encoder: Runner, codes_out: np.memmap, progress: Progress) -> _Counts:
    """Run the graph over every batch after the resume point, recording progress as it goes."""
    out = plan.out
    done = _Counts(progress.done, progress.written, 0, tuple(progress.skipped))
    synced_at = time.monotonic()

    def record_progress() -> None:
        """Rows on disk first, then the record that says so; at most every SYNC_SECONDS, and on interrupt."""
        codes_out.flush()
        record = {**plan.signature, "done": done.finished, "written": done.written}
        write_json(progress_path(out), {**record, "skipped": [s.to_dict() for s in done.skipped]})

    try:
        batches = read_batches(plan.images, plan.options, plan.batch_size, plan.workers, plan.shape, progress.done)
        for batch in batches:
            if len(batch.pixels):
                codes_out[done.written : done.written + len(batch.pixels)] = encoder(batch.pixels)
            done = _Counts(
                batch.first + batch.files,
                done.written + len(batch.pixels),
                done.resized + batch.resized,
                (*done.skipped, *batch.skipped),
            )
            if time.monotonic() - synced_at > SYNC_SECONDS:
                record_progress()
                synced_at = time.monotonic()
    except VqtoolError:
        # Bad input changes the file list, so these rows could never be resumed: drop them.
        partial_path(out).unlink(missing_ok=True)
        progress_path(out).unlink(missing_ok=True)
        raise
    except KeyboardInterrupt:
        record_progress()
        raise EncodeInterrupted(
            f"interrupted after {done.finished} of {len(plan.images.keys)} images; the finished rows are kept: "
            "run the same command with --resume to continue",
            out,
        ) from None
    # Every row is recorded before the output is finished: a finish that fails (a full disk) leaves a run that
    # --resume completes without encoding again.
    record_progress()
    return done


def finish_codes(
    plan: EncodePlan,
    contract: Contract,
    written: int,
    skipped: Sequence[SkippedFile],
    early_sidecar: StagedOutput | None = None,
) -> None:
    """Put the codes (the first `written` rows of the plan's partial file) and their sidecar in place under their
    final names, or nothing if no file could be read. Both engines, local and Ray, end here."""
    out, partial = plan.out, partial_path(plan.out)
    if not written:
        partial.unlink(missing_ok=True)
        progress_path(out).unlink(missing_ok=True)
        raise VqtoolError(
            f"none of the {len(plan.images.keys)} files could be read, so nothing was written: {skipped[0].reason}"
        )
    if written < len(plan.images.keys):
        shrink_rows(partial, written)
    if is_parquet(out):
        codes = np.load(partial, mmap_mode="r")
        sidecar = plan.sidecar(contract, skipped)
        write_codes_parquet(out, codes, sidecar.files, sidecar)
        del codes
        partial.unlink()
        progress_path(out).unlink(missing_ok=True)
        return
    # The sidecar is renamed into place before the codes: a crash between leaves old codes with a
    # sidecar whose file count no longer matches, which decode reports, never a silent mismatch.
    if early_sidecar is not None:
        early_sidecar.commit()
    else:
        write_json(sidecar_path(out), plan.sidecar(contract, skipped).to_dict())
    usual_mode(partial)
    os.replace(partial, out)
    progress_path(out).unlink(missing_ok=True)
