"""Outputs appear under their final name complete or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path: Path) -> None:
    """mkstemp/mkdtemp make 0600/0700; give outputs the permissions a plain open() would."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def partial_path(final: Path) -> Path:
    """The fixed temporary name of a resumable output (encode), so a later run can find it."""
    return final.with_name(f".{final.name}.partial")


@contextmanager
def atomic_output(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds.

    A failed block removes the temporary file and leaves the previous `final`, if any, untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        usual_mode(temp)
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_bytes(final: Path | str, data: bytes) -> None:
    with atomic_output(final) as temp:
        temp.write_bytes(data)


def write_json(final: Path | str, payload: Any) -> None:
    write_bytes(final, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
