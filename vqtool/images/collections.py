"""Reading a whole image collection into memory: a folder, a .npy/.npz array, or CIFAR-10 batches.

Training streams folders, lists, .npy arrays and tar shards instead (vqtool.train.sources).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vqtool.errors import VqtoolError, first_line
from vqtool.images.fit import Fit
from vqtool.images.reading import SkippedFile, list_images, read_each, read_rgb

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


def _check_array(images: Any, path: Path) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise VqtoolError(f"expected uint8 images shaped N x H x W x 3, got shape {shape}", path)
    if images.dtype != np.uint8:
        raise VqtoolError(f"expected uint8 images, got dtype {images.dtype}", path)
    if len(images) == 0:
        raise VqtoolError("the array holds no images", path)
    return images


def read_npy_header(handle: BinaryIO) -> tuple[tuple[int, int], tuple[int, ...], bool, np.dtype]:
    """(format version, shape, Fortran order, dtype) of the .npy open in `handle`, which is left at the data."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    return version, shape, fortran, dtype


class NpyRows:
    """The images of a .npy, read row by row with positioned reads: never read whole, and never mapped.

    A memory map (np.load(mmap_mode="r")) reads only the rows asked for too, but every page it maps counts
    in the process's RSS, and with the kernel's large page-cache folios a run over 200,000 images had the
    whole 600 MB file mapped after reading its 2,000 validation rows. Reads leave pages in the page cache,
    outside any process. One descriptor per process; os.pread needs no shared file position, so forked
    readers can share it.
    """

    def __init__(self, path: Path) -> None:
        try:
            with open(path, "rb") as handle:
                _, shape, fortran, dtype = read_npy_header(handle)
                self.offset = handle.tell()
                size = os.fstat(handle.fileno()).st_size
        except Exception as exc:  # whatever NumPy's header parser raises on a damaged file
            raise VqtoolError(f"cannot read as a NumPy array ({first_line(exc)})", path) from None
        if len(shape) != 4 or shape[-1] != 3:
            raise VqtoolError(f"expected uint8 images shaped N x H x W x 3, got shape {shape}", path)
        if dtype != np.uint8:
            raise VqtoolError(f"expected uint8 images, got dtype {dtype}", path)
        if shape[0] == 0:
            raise VqtoolError("the array holds no images", path)
        if fortran:
            raise VqtoolError("is stored in Fortran order; save it in C order (np.ascontiguousarray)", path)
        self.path, self.shape = path, tuple(shape)
        self.row_bytes = int(np.prod(shape[1:]))
        if self.offset + self.row_bytes * shape[0] > size:
            raise VqtoolError(f"is truncated: {shape[0]} images need more bytes than the file holds", path)
        self._fd: tuple[int, int] | None = None  # (pid, descriptor)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        data = os.pread(self._fd[1], self.row_bytes, self.offset + index * self.row_bytes)
        return np.frombuffer(data, np.uint8).reshape(self.shape[1:])


def read_array(path: Path) -> np.ndarray:
    """A uint8 N x H x W x 3 array from a .npy or .npz, read whole."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = list(loaded.keys())
                key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
                if key is None:
                    raise VqtoolError(f"holds several arrays ({', '.join(keys)}); name the images array 'images'", path)
                loaded = loaded[key]
    except VqtoolError:
        raise
    except Exception as exc:  # as codes.load_codes_array: a damaged header can raise whatever NumPy's parser raises
        reason = first_line(exc)
        raise VqtoolError(f"cannot read as a NumPy array ({reason})", path) from None
    return _check_array(loaded, path)


def _cifar_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR-10 python batch names: NumPy's array reconstruction (under NumPy 1's and 2's module
    names; `_frombuffer` is what pickle protocol 5 uses), `ndarray` and `dtype`. Taken from NumPy's own reduction
    of an array, so no module is imported by name."""
    probe = np.zeros(1, np.uint8)
    reconstruct, from_buffer = probe.__reduce_ex__(2)[0], probe.__reduce_ex__(5)[0]
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): from_buffer,
        ("numpy._core.numeric", "_frombuffer"): from_buffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles: an exact allow-list of the names they hold, and any other name refused before
    it is looked up, let alone called."""

    allowed = _cifar_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a CIFAR-10 batch never holds; refusing to load it"
            )
        return found


def _read_cifar_batch(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
        flat = np.asarray(batch[b"data"], dtype=np.uint8)
        return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    except FileNotFoundError:
        raise VqtoolError("missing CIFAR-10 batch file", path) from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
        raise VqtoolError(f"not a CIFAR-10 python batch ({exc})", path) from None


def is_cifar_folder(path: Path) -> bool:
    return path.is_dir() and (path / CIFAR_TRAIN_BATCHES[0]).is_file()


def _resize_all(images: np.ndarray, size: int, path: Path) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([Fit().apply(im, size, 1, path) for im in images])


def _read_folder(path: Path, size: int, fit: Fit, skipped: list[SkippedFile] | None) -> np.ndarray:
    """Every image under `path`, brought to size x size; a bad file stops the read, unless `skipped` collects it."""

    def read(name: Path) -> np.ndarray:
        return fit.apply(read_rgb(name, fit.max_pixels), size, 1, name)

    images = [pixels for _, pixels in read_each(list_images([path]), read, skipped)]
    if not images:
        raise VqtoolError("none of the images here could be read", path)
    return np.stack(images)


def read_image_set(
    path: Path, size: int, *, fit: Fit | None = None, skipped: list[SkippedFile] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images N x size x size x 3 from `path`, and the collection's own validation images if it has them.

    Image files are brought to the size as `fit` says (default: resized whole; a fit that keeps sizes is taken to
    resize, since the images are stacked), and those larger than its pixel limit are refused from their header. A
    file that cannot be read raises the one-line error, or, when a `skipped` list is given, is left out and added
    to it.
    """
    fit = fit or Fit()
    if not fit.resizes:
        fit = Fit(max_pixels=fit.max_pixels)
    if is_cifar_folder(path):
        train = np.concatenate([_read_cifar_batch(path / name) for name in CIFAR_TRAIN_BATCHES])
        test = path / CIFAR_TEST_BATCH
        val = _read_cifar_batch(test) if test.is_file() else None
        return _resize_all(train, size, path), None if val is None else _resize_all(val, size, path)
    if path.is_file() and path.suffix.lower() in (".npy", ".npz"):
        return _resize_all(read_array(path), size, path), None
    return _read_folder(path, size, fit, skipped), None
