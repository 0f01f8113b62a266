"""Outputs appear under their final name complete or not at all."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vqtool.formats.space import out_of_space


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


def _temporary_beside(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(handle)
    return Path(name)


def _make_durable(temp: Path) -> None:
    """The file's bytes on disk, with the permissions a plain open() would give it: ready to be renamed into place."""
    with open(temp, "rb+") as written:
        os.fsync(written.fileno())
    usual_mode(temp)


@contextmanager
def atomic_output(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds.

    A failed block removes the temporary file and leaves the previous `final`, if any, untouched.
    """
    final = Path(final)
    temp = _temporary_beside(final)
    try:
        yield temp
        _make_durable(temp)
        os.replace(temp, final)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise out_of_space(exc, final) or exc from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class StagedOutput:
    """An output whose contents are known early: written and synced beside `final` by a background thread while
    the caller works on, then renamed into place by commit(), or removed by discard(). The rename is all that
    is left for the end, so the wait for the disk overlaps the caller's work instead of following it."""

    def __init__(self, final: Path | str, contents: Callable[[], bytes]) -> None:
        self.final = Path(final)
        self._temp: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, args=(contents,), name="staged-output", daemon=True)
        self._thread.start()

    def _write(self, contents: Callable[[], bytes]) -> None:
        try:
            self._temp = _temporary_beside(self.final)
            self._temp.write_bytes(contents())
            _make_durable(self._temp)
        except OSError as exc:  # handed to the caller by commit(); a full disk as its one line
            self._error = out_of_space(exc, self.final) or exc
        except BaseException as exc:
            self._error = exc

    def commit(self) -> None:
        """Wait for the write, then put the file in place (raising what the write raised, if it failed)."""
        self._thread.join()
        if self._error is not None:
            self.discard()
            raise self._error
        assert self._temp is not None
        os.replace(self._temp, self.final)
        self._temp = None

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()  # nothing left to remove once committed

    def discard(self) -> None:
        self._thread.join()
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None


def write_bytes(final: Path | str, data: bytes) -> None:
    with atomic_output(final) as temp:
        temp.write_bytes(data)


def json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()


def write_json(final: Path | str, payload: Any) -> None:
    write_bytes(final, json_bytes(payload))
