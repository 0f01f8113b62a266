"""`vqtool encode --engine ray`: the encode pipeline on Ray Data, on a local instance or an existing cluster.

The driver plans as the local engine does (the same checks, the same row order and keys) and hands Ray a table
saying where each image is. A Ray Data map reads and decodes the images (Ray fuses it into the actors when both
run on CPUs, as tasks of its own otherwise), `TokenizeBatch` actors (one export opened in each) run the encoder,
and each finished block's codes stream back to the driver (`iter_batches`), which stores them with their row
numbers in a staging folder beside the output. Codes are small (a 256 x 256 image's are 2 KiB), so the driver
can take them all, and the staging folder needs no file system shared with the workers, as Ray's
`write_parquet` would (with a stage of write tasks of its own). The driver then puts each row in its place: a
row Ray ran twice (a retried task) is written once, a row missing means nothing is put in place, and the result
is the local engine's file, byte for byte. An interrupted run keeps the staging folder, and `--resume` sends Ray
only the rows not yet stored there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from vqtool.data.sets import located_refs
from vqtool.data.specs import image_set
from vqtool.errors import VqtoolError, first_line, missing_extra
from vqtool.formats.atomic import atomic_output, partial_path, write_json
from vqtool.formats.contract import contract_of, joined
from vqtool.formats.manifest import read_manifest
from vqtool.formats.space import allocated_memmap
from vqtool.images.fit import KEEP, Fit
from vqtool.images.reading import SkippedFile
from vqtool.pipeline.encode import (
    EncodeInterrupted,
    EncodeOptions,
    EncodePlan,
    EncodeResult,
    codes_output,
    finish_codes,
    interrupt_on_sigterm,
    plan_encode,
    report_notes,
    written_sidecar,
)
from vqtool.pipeline.reading import ReadOptions, fitted_image
from vqtool.ray.batch import TokenizeBatch
from vqtool.runtime.select import RuntimeChoice

# Rows per block of the table Ray starts from (a decode task's share): as many as fill BLOCK_BYTES of decoded
# pixels, up to MAX_BLOCK_ROWS. Each block pays a task's and a stored file's overhead, which for small images
# outweighs their decoding unless blocks hold thousands of them.
BLOCK_BYTES = 32 * 2**20
MAX_BLOCK_ROWS = 2048


def staging_path(out: Path) -> Path:
    """The folder beside the output where the command stores the blocks Ray returns until it joins them."""
    return out.with_name(f".{out.name}.ray")


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (ray.data below)
    except ModuleNotFoundError:
        raise missing_extra("--engine ray", "ray", "ray") from None
    return ray


def encode_on_ray(
    inputs: Sequence[str | Path],
    out: Path,
    model: Path,
    options: EncodeOptions = EncodeOptions(),
    runtime: RuntimeChoice = RuntimeChoice(),
    *,
    address: str | None = None,
    actors: int | None = None,
    tokenizer_class: type[TokenizeBatch] = TokenizeBatch,
    log: Callable[[str], None] = print,
) -> EncodeResult:
    """Encode `inputs` into `out` (codes.npy + sidecar, or codes.parquet) on Ray Data, with encode's `options` and
    the `runtime` each actor opens the export with.

    `address` joins an existing cluster (ray.init's address: "auto", "ray://host:10001", ...); without one a
    local instance starts, with one CPU per core. `actors` is the number of TokenizeBatch actors (default: one
    per CPU of the cluster, each with the runtime's threads, by default the CPUs shared among them: one each).
    `tokenizer_class` is the actor class, TokenizeBatch or a subclass of it. An existing `out` is replaced only
    with `options.overwrite` (or continued with `options.resume`), and no other run may write `out` meanwhile.
    """
    if options.shard is not None:
        raise VqtoolError("--shard splits work between Slurm array tasks; --engine ray spreads it over its cluster")
    ray = _ray()
    started = time.perf_counter()
    resume = options.resume
    with codes_output(out, overwrite=options.overwrite, resume=resume, left_behind=lambda out: (staging_path(out),)):
        images = image_set(inputs, image_column=options.image_column, key_column=options.key_column)
        plan = plan_encode(images, read_manifest(model), model, out, options, runtime.precision)
        staging = staging_path(out)
        done_before = _stored_rows(staging, plan.signature, resume, log)
        with ray_session(ray, address) as cluster_cpus:
            # One single-threaded actor per CPU measured faster than fewer actors with more threads each: each actor
            # decodes its block and then runs the graph, so with several the decoding of one overlaps another's.
            actors = actors or cluster_cpus
            runtime = replace(runtime, threads=runtime.threads or max(1, cluster_cpus // actors))
            workers = f"{cluster_cpus} CPUs, {actors} tokenizer actor(s) of {runtime.threads} threads"
            stored = f", {len(done_before)} already stored" if done_before else ""
            log(f"encoding {len(plan.images.keys)} images on Ray ({workers}){stored}")
            table = _located_table(plan, done_before)
            if table.num_rows:
                dataset = _dataset(ray, plan, table, tokenizer_class, model, runtime, actors)
                try:
                    _store_blocks(dataset, staging, options.skip_bad)
                except KeyboardInterrupt:
                    raise EncodeInterrupted(
                        "interrupted; the blocks Ray stored are kept: run the same command with --resume to continue",
                        out,
                    ) from None
                except Exception as exc:
                    raise _user_error(exc) from None
        written, resized, skipped, runtimes = _join(plan, staging)
        contracts = [contract_of(model, backend, runtime.precision) for backend in sorted(runtimes)]
        contract = joined(contracts, f"the blocks Ray stored for {out}")
        finish_codes(plan, contract, written, skipped)
        shutil.rmtree(staging, ignore_errors=True)
        report_notes(plan, written, resized, skipped, log)
        return EncodeResult(
            out,
            written_sidecar(out),
            written,
            plan.grid,
            f"Ray Data, {actors} x TokenizeBatch ({runtime.backend})",
            resized,
            time.perf_counter() - started,
            len(done_before),
            tuple(skipped) if options.skip_bad else None,
            contract,
        )


@contextlib.contextmanager
def ray_session(ray: Any, address: str | None) -> Iterator[int]:
    """Ray as the caller found it, or started here (and shut down after): a local instance, or a cluster joined."""
    ours = not ray.is_initialized()
    # Ray Data logs each execution's plan and progress; the command says what it does in its own lines.
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)
    if ours:
        ray.init(
            # "local" starts an instance of our own even where `ray start` left one running on this machine.
            address=address or "local",
            num_cpus=None if address else os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
    # Schedulers preempt with SIGTERM, and ray.init installs a handler that exits on the spot: an interrupt
    # instead keeps the stored blocks and shuts Ray down, and --resume continues.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt_on_sigterm) if main else None
    try:
        yield int(ray.cluster_resources().get("CPU", 1))
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        data_log.setLevel(level)
        if ours:
            ray.shutdown()


def _located_table(plan: EncodePlan, done: set[int]) -> Any:
    """Row number and locator of every image not yet stored, as an Arrow table."""
    import pyarrow as pa

    located = plan.images.locators()
    index = np.arange(len(located.kind), dtype=np.int64)
    keep = np.ones(len(index), bool)
    if done:
        keep[np.fromiter(done, np.int64)] = False
    chosen = np.flatnonzero(keep)
    return pa.table(
        {
            "index": index[chosen],
            "kind": located.kind[chosen],
            "source": pa.array([located.source[i] for i in chosen], pa.string()),
            "offset": located.offset[chosen],
            "size": located.size[chosen],
            "name": pa.array([located.name[i] for i in chosen], pa.string()),
        }
    )


def _dataset(
    ray: Any,
    plan: EncodePlan,
    table: Any,
    tokenizer_class: type[TokenizeBatch],
    model: Path,
    runtime: RuntimeChoice,
    actors: int,
) -> Any:
    """The pipeline: the located rows read and decoded, then encoded in `actors` TokenizeBatch actors opened with
    `runtime`."""
    image_bytes = plan.shape[0] * plan.shape[1] * 3
    # Enough blocks for every actor to have one, where there are rows enough.
    block = min(MAX_BLOCK_ROWS, max(plan.batch_size, BLOCK_BYTES // image_bytes), -(-table.num_rows // actors))
    block = max(block, 1)
    blocks = -(-table.num_rows // block)
    actors = min(actors, blocks)
    image_column = getattr(plan.images, "image_column", None)
    dataset = ray.data.from_arrow(table, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        _decode_rows,
        fn_kwargs={"options": plan.options, "shape": plan.shape, "image_column": image_column},
        batch_size=None,
        batch_format="numpy",
    )
    dataset = dataset.map_batches(
        tokenizer_class,
        fn_constructor_kwargs={
            "model": str(model),
            "image_column": "pixels",
            "runtime": runtime,
            "fit": Fit(KEEP),  # the decode tasks brought every image to the plan's size
            "batch_size": plan.batch_size,
            "runtime_column": "runtime",
            "keep_images": False,
        },
        concurrency=actors,
        batch_size=plan.batch_size,
        batch_format="numpy",
        # Ray hides GPUs from actors that do not ask for one: with --device cuda each actor takes a GPU (and the
        # decoding then runs in separate tasks, on CPUs, instead of fused into the actors).
        num_gpus=1 if runtime.device == "cuda" else None,
    )
    return dataset


def _decode_rows(
    rows: dict[str, np.ndarray], options: ReadOptions, shape: tuple[int, int], image_column: str | None
) -> dict[str, np.ndarray]:
    """A Ray task: the block's images read and brought to the plan's size, as the local engine's readers do. A bad
    one is a row with its reason and blank pixels: under --skip-bad the driver leaves it out, without it the
    driver stops the run with its one-line error. (Raised here, the error would reach the driver as Ray Data's
    "UDF failed to process a data block", without the file or the reason.)"""
    loads = located_refs(rows["kind"], rows["source"], rows["offset"], rows["size"], rows["name"], image_column)
    pixels = np.zeros((len(loads), *shape, 3), np.uint8)
    resized = np.zeros(len(loads), bool)
    reasons = np.full(len(loads), "", dtype=object)
    for row, load in enumerate(loads):
        try:
            pixels[row], resized[row] = fitted_image(load, options, shape)
        except VqtoolError as error:
            reasons[row] = error.reason
    return {"index": rows["index"], "name": rows["name"], "pixels": pixels, "resized": resized, "reason": reasons}


def _user_error(exc: Exception) -> Exception:
    """The VqtoolError a Ray task raised (one line naming the file), or a one-line error for anything else."""
    seen: Exception | BaseException | None = exc
    while seen is not None:
        cause = getattr(seen, "cause", None)
        if isinstance(seen, VqtoolError):
            return seen
        if isinstance(cause, VqtoolError):
            return cause
        seen = seen.__cause__ or (cause if isinstance(cause, BaseException) else None)
    return VqtoolError(f"the Ray run failed ({first_line(exc)})")


# ---- the staging folder: what a run stored, and resuming from it -----------------------------------------------


def _stored_rows(staging: Path, signature: dict[str, object], resume: bool, log: Callable[[str], None]) -> set[int]:
    """Rows an interrupted run with the same files, model and options stored, with --resume; else a fresh start."""
    record = staging / "signature.json"
    if staging.exists() and resume:
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError, RecursionError):
            saved = None
        if saved != json.loads(json.dumps(signature)):
            raise VqtoolError(
                "the interrupted run encoded other files or used another model; rerun without --resume", staging
            )
        rows, grid = cast(int, signature["rows"]), cast(list[int], signature["grid"])  # plan_encode's
        return {int(i) for part in _parts(staging, rows, int(np.prod(grid))) for i in part["index"]}
    if staging.exists():
        log(f"{staging}: an interrupted earlier run left stored blocks; starting over (use --resume to continue it)")
        shutil.rmtree(staging)
    elif resume:
        log(f"nothing to resume for {staging}; starting from the first image")
    staging.mkdir(parents=True)
    write_json(record, signature)
    return set()


def _store_blocks(dataset: Any, staging: Path, skip_bad: bool) -> None:
    """Each finished block as the driver receives it, stored under its first row's number: written under a
    temporary name and renamed, so that a block is stored whole or not at all. Without `skip_bad`, a block with a
    bad image ends the run with that image's error (the first in row order within the block)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        index = np.asarray(block["index"], np.int64)
        if not len(index):
            continue
        bad = [row for row, reason in enumerate(block["reason"]) if reason]
        if bad and not skip_bad:
            first = min(bad, key=lambda row: index[row])
            raise VqtoolError(str(block["reason"][first]), str(block["name"][first]))
        codes = np.ascontiguousarray(block["codes"])
        table = pa.table(
            {
                "index": index,
                "codes": pa.FixedSizeListArray.from_arrays(codes.reshape(-1), int(np.prod(codes.shape[1:]))),
                "resized": np.asarray(block["resized"], bool),
                "reason": pa.array([str(r) for r in block["reason"]], pa.string()),
                "name": pa.array([str(n) for n in block["name"]], pa.string()),
                "runtime": pa.array([str(r) for r in block["runtime"]], pa.string()),
            }
        )
        path = staging / f"rows-{int(index.min()):012d}-{len(index)}.parquet"
        with atomic_output(path) as temporary:  # a unique name (O_EXCL), never a link left in the folder
            pq.write_table(table, temporary)


def _parts(staging: Path, rows: int, cells: int) -> Iterator[dict[str, Any]]:
    """Each stored block's columns (codes flat, row after row, `cells` codes a row); a file that cannot be read, or
    whose rows are not rows of this run's `rows`, is removed (its rows run again)."""
    import pyarrow.parquet as pq

    for path in sorted(staging.glob("*.parquet")):
        try:
            table = pq.read_table(path)
            part = {
                "index": table.column("index").to_numpy(),
                "codes": table.column("codes").combine_chunks().flatten().to_numpy(),
                "resized": table.column("resized").to_numpy(),
                "reason": table.column("reason").to_pylist(),
                "name": table.column("name").to_pylist(),
                "runtime": set(table.column("runtime").to_pylist()),
            }
            index = part["index"]
            if not (
                index.dtype.kind in "iu"
                and ((index >= 0) & (index < rows)).all()
                and part["codes"].size == len(index) * cells
                and len(part["resized"]) == len(part["reason"]) == len(part["name"]) == len(index)
            ):
                raise ValueError("a block whose rows are not this run's")
        except Exception:  # a truncated or half-written block: its rows were never counted as stored
            path.unlink(missing_ok=True)
            continue
        yield part


def _join(plan: EncodePlan, staging: Path) -> tuple[int, int, list[SkippedFile], set[str]]:
    """Put every stored row in its place in the plan's partial file; (rows written, resized, skipped files, the
    runtimes that ran the encoder)."""
    total = len(plan.images.keys)
    partial = partial_path(plan.out)
    codes = allocated_memmap(partial, plan.dtype, (total, *plan.grid), shown=plan.out)
    seen = np.zeros(total, bool)
    bad = np.zeros(total, bool)
    resized = 0
    reasons: dict[int, SkippedFile] = {}
    runtimes: set[str] = set()
    for part in _parts(staging, total, int(np.prod(plan.grid))):
        runtimes |= part["runtime"]
        index = part["index"]
        part["codes"] = part["codes"].reshape(len(index), *plan.grid)
        again = seen[index]
        if again.any():  # a retried task stored these rows twice: they must agree
            earlier = codes[index[again]]
            if not np.array_equal(earlier, part["codes"][again]):
                raise VqtoolError("two Ray tasks gave different codes for the same rows; rerun without --resume")
        fresh = ~again
        codes[index[fresh]] = part["codes"][fresh]
        seen[index[fresh]] = True
        resized += int(part["resized"][fresh].sum())
        for row, reason, name in zip(index, part["reason"], part["name"], strict=True):
            if reason:
                bad[row] = True
                reasons[int(row)] = SkippedFile(str(name), str(reason))
    missing = int((~seen).sum())
    if missing:
        del codes
        partial.unlink(missing_ok=True)
        raise VqtoolError(f"Ray stored {total - missing} of {total} rows; run the same command with --resume", staging)
    written = total
    if bad.any():  # under --skip-bad: the kept rows move up, in order
        kept = np.flatnonzero(~bad)
        for start in range(0, len(kept), 65536):
            rows = kept[start : start + 65536]
            codes[start : start + len(rows)] = codes[rows]
        written = len(kept)
    codes.flush()
    del codes
    return written, resized, [reasons[row] for row in sorted(reasons)], runtimes
