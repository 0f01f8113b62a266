"""What lets an interrupted encode continue: the progress record beside the output, and the rows cut to size."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.errors import VqtoolError
from vqtool.formats.atomic import partial_path
from vqtool.formats.space import open_file_itself, read_npy_header
from vqtool.images.reading import SkippedFile
from vqtool.precisions import EXACT_CONTRACT


def progress_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.progress.json")


@dataclass(frozen=True)
class Progress:
    """How far an interrupted run got: files consumed, rows written, files skipped on the way."""

    done: int = 0
    written: int = 0
    skipped: tuple[SkippedFile, ...] = ()


def resume_point(out: Path, signature: dict[str, object], resume: bool, log: Callable[[str], None]) -> Progress:
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
        theirs, ours = saved.get("contract", EXACT_CONTRACT), signature.get("contract", EXACT_CONTRACT)
        if theirs != ours:
            raise VqtoolError(
                f"the interrupted run's codes were made under the {theirs} contract and this run's would be "
                f"under the {ours} one; rerun without --resume, or with the interrupted run's runtime",
                out,
            )
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
    except (UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError, RecursionError):
        raise VqtoolError("progress record is corrupt; rerun without --resume", progress) from None


def shrink_rows(path: Path, rows: int) -> None:
    """Cut a C-order .npy to its first `rows` rows in place: rewrite the shape in the header, truncate the data.

    Used when --skip-bad left rows unused at the end; copying the codes instead would cost a pass over them.
    NumPy pads headers so that the row count can change in place, and writing the header through NumPy
    gives the bytes a fresh np.save would: shards merged later match a single pass byte for byte.
    """
    with os.fdopen(open_file_itself(path, os.O_RDWR), "r+b") as handle:
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
