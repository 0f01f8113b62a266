"""CIFAR-10's python batches: pickles, read with an exact allow-list of the names they hold and nothing else."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.errors import VqtoolError

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


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


def read_cifar_batch(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
        flat = np.asarray(batch[b"data"], dtype=np.uint8)
        return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    except FileNotFoundError:
        raise VqtoolError("missing CIFAR-10 batch file", path) from None
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, ValueError, TypeError) as exc:
        raise VqtoolError(f"not a CIFAR-10 python batch ({exc})", path) from None


def is_cifar_folder(path: Path) -> bool:
    return path.is_dir() and (path / CIFAR_TRAIN_BATCHES[0]).is_file()
