"""Room on disk: space reserved before a memory-mapped output is written, and a full disk said in one line.

Codes are written through a memory map, and a memory-mapped page that the file system cannot back ends the
process with SIGBUS, not an error. So the whole file is allocated (posix_fallocate) before its first row is
written: a disk that cannot hold it is refused then, in one line, with nothing lost.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vqtool.errors import VqtoolError, first_line

# What a full disk, a full quota and a file-size limit (ulimit -f) answer a write or an allocation.
FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
TOO_LARGE = frozenset({errno.EFBIG})


def _mount_point(path: Path) -> Path:
    """The mount point of the file system that holds `path` (or would hold it)."""
    here = path.absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    while not os.path.ismount(here) and here != here.parent:
        here = here.parent
    return here


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(_mount_point(path)).free
    except OSError:
        return 0


def out_of_space(
    exc: OSError, path: Path | str | None = None, needed: int | None = None, what: str = "it"
) -> VqtoolError | None:
    """The one-line error for an OSError that says the disk (or the file-size limit) is full, else None. `path` is
    the output the user knows (default: the file the error names), `needed` what `what` needs in bytes."""
    where = Path(path if path is not None else exc.filename or ".")
    if exc.errno in FULL:
        need = f": {what} need {needed:,} bytes, {_free_bytes(where):,} free" if needed is not None else ""
        return VqtoolError(f"no space left on {_mount_point(where)}{need}", where)
    if exc.errno in TOO_LARGE:
        size = f" ({what} need {needed:,} bytes)" if needed is not None else ""
        return VqtoolError(f"over this process's file-size limit, ulimit -f{size}", where)
    return None


def reserve(path: Path, size: int, *, shown: Path, what: str) -> None:
    """Allocate the first `size` bytes of the file at `path` on disk now, or raise the one-line error naming `shown`
    (the output the user asked for) and `what` needs the room."""
    handle = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(handle, 0, size)
    except OSError as exc:
        error = out_of_space(exc, shown, size, what)
        if error is not None:
            raise error from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        # A file system that cannot allocate ahead: the free space is the best check left.
        free = _free_bytes(path)
        if free < size:
            raise VqtoolError(
                f"no space left on {_mount_point(path)}: {what} need {size:,} bytes, {free:,} free", shown
            ) from None
    finally:
        os.close(handle)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header np.lib.format.open_memmap would write for a new C-order array (format 1.0 where it fits)."""
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    header = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(header, fields)
    except ValueError:  # a header over 64 KiB
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, fields)
    return header.getvalue()


def read_npy_header(handle: BinaryIO) -> tuple[tuple[int, int], tuple[int, ...], bool, np.dtype]:
    """(format version, shape, Fortran order, dtype) of the .npy open in `handle`, which is left at the data."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    return version, shape, fortran, dtype


def open_file_itself(path: Path, flags: int, mode: int = 0o666) -> int:
    """os.open of `path` itself: never through a link planted at that name (it would send what vqtool writes to
    the file the link points at, outside the output's folder), and never anything but a regular file."""
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VqtoolError("is a link, not a file vqtool wrote; remove it", path) from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise VqtoolError("is not a regular file; remove it", path)
    return descriptor


def writable_npy(path: Path) -> np.memmap:
    """The .npy at `path` memory-mapped for writing, opened as open_file_itself opens it; a damaged header is
    refused in one line."""
    with os.fdopen(open_file_itself(path, os.O_RDWR), "r+b") as handle:
        try:
            _, shape, fortran, dtype = read_npy_header(handle)
            if dtype.hasobject:
                raise ValueError("it holds Python objects, not codes")
            offset = handle.tell()
            return np.memmap(handle, dtype=dtype, mode="r+", offset=offset, shape=shape, order="F" if fortran else "C")
        except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, tokenize's TokenError, ...
            raise VqtoolError(f"is damaged ({first_line(exc)})", path) from None


def allocated_memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...], *, shown: Path) -> np.memmap:
    """A new .npy at `path` with every byte of it allocated on disk, memory-mapped for writing; a disk that cannot
    hold it is refused in one line naming `shown` (the output the user asked for), and the file is removed.

    The file is made here rather than by open_memmap, which extends it with a write past its end: on a full disk
    that write, not the allocation, would fail, and with no word of what was needed. Whatever was at `path` goes
    first (an earlier run's file, or a link: the link itself, never what it points at)."""
    dtype = np.dtype(dtype)
    header = _npy_header(dtype, shape)
    size = len(header) + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    path.unlink(missing_ok=True)
    try:
        with os.fdopen(open_file_itself(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as handle:
            handle.write(header)
        reserve(path, size, shown=shown, what="the codes")
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise out_of_space(exc, shown, size, "the codes") or exc from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return writable_npy(path)
