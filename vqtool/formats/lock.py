"""One writer per output: an exclusive lock beside it, held for the whole run, saying who holds it.

The lock is `flock` on a small file `.NAME.lock` beside the output, which names the holder (pid, start time, host,
command). The kernel releases a `flock` when its holder dies however it dies, so a lock file left by a killed run is
simply taken over; a live holder makes a second run stop in one line that names it. On a file system without
`flock`, the lock file is created exclusively instead, and taken over only when its holder is this machine's process
that no longer runs.

Whoever holds the lock may also clear what earlier, killed runs of the same output left behind: temporary files
under vqtool's own naming (`.NAME.XXXXXXXX.tmp`), never anything else.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from vqtool.errors import VqtoolError

# mkstemp's names: the prefix given, eight characters of its alphabet, the suffix given.
_TEMPORARY = re.compile(r"\.[a-z0-9_]{8}\.tmp")
# Folders export works in: its staging folder (mkdtemp's name), and the old export it moves aside while publishing.
_LEFT_FOLDER = re.compile(r"\.staging-[a-z0-9_]{8}|\.old-\d+")


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


def _holder_record() -> bytes:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = " ".join([os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]])[:300]
    record = {"pid": os.getpid(), "started": started, "host": socket.gethostname(), "command": command}
    return json.dumps(record).encode()


def _read_holder(path: Path) -> dict[str, object]:
    try:
        raw = json.loads(path.read_bytes() or b"{}")
    except (OSError, ValueError, RecursionError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _busy(output: Path, holder: dict[str, object]) -> VqtoolError:
    who = f"pid {holder.get('pid', '?')}, started {holder.get('started', 'at an unknown time')}"
    if holder.get("host") not in (None, socket.gethostname()):
        who += f" on {holder['host']}"
    return VqtoolError(
        f"another vqtool run is writing this output ({who}); wait for it to end, or choose another output", output
    )


def _process_gone(holder: dict[str, object]) -> bool:
    """Whether the holder named in a lock file is a process of this machine that no longer runs."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


# What a file system without `flock` answers (some FUSE and network mounts).
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputLock:
    """The exclusive right to write `output` (a file or a folder) and what vqtool derives from its name."""

    def __init__(self, output: Path | str) -> None:
        # Absolute and normalised: `--out .` or `--out ..` names a folder whose lock lies beside it, wherever the
        # run was started from.
        self.output = Path(os.path.abspath(output))
        if self.output == self.output.parent:
            raise VqtoolError("is the file system's root; name a folder inside it", self.output)
        self.path = lock_path(self.output)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # each retry follows a holder that removed its file while this run opened it
            created, fd = self._open()
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(self.output, _read_holder(self.path)) from None
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise
                if not created:  # without flock, a file this run did not create is held while its process runs
                    holder = _read_holder(self.path)
                    os.close(fd)
                    if not _process_gone(holder):
                        raise _busy(self.output, holder) from None
                    self.path.unlink(missing_ok=True)
                    continue
            else:
                if not self._still_named(fd):
                    os.close(fd)
                    continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_record(), 0)
            self._fd = fd
            return self
        raise _busy(self.output, _read_holder(self.path))

    def _open(self) -> tuple[bool, int | None]:
        """(whether this run created it, a descriptor) of the lock file; no descriptor if it vanished meanwhile."""
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            return True, os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        except PermissionError as exc:  # EACCES; a read-only file system answers EROFS, an OSError of its own
            why = f"cannot make the lock beside it ({exc.strerror}): vqtool writes its lock in the folder that holds it"
            raise VqtoolError(why, self.output) from None
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            why = "is on a read-only file system: vqtool writes its lock in the folder that holds it"
            raise VqtoolError(why, self.output) from None
        try:
            return False, os.open(self.path, flags)
        except FileNotFoundError:
            return False, None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise VqtoolError("is a symbolic link where vqtool keeps its lock; remove it", self.path) from None
            raise

    def _still_named(self, fd: int) -> bool:
        """Whether the lock file's name still holds the file this run locked: a holder removes it as it lets go."""
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still held, so that no run can lock the file and then find it gone.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def clear_temporaries(self, *finals: Path) -> None:
        """Remove what killed runs left beside each of `finals`: `.NAME.XXXXXXXX.tmp` files (mkstemp's names) and
        export's `.NAME.staging-XXXXXXXX` and `.NAME.old-PID` folders: only vqtool makes such names, and under this
        lock no live run is using them."""
        if self._fd is None:
            raise RuntimeError("clear_temporaries needs the lock")
        for final in finals:
            folder = final.parent
            if not folder.is_dir():
                continue
            prefix = f".{final.name}"
            for entry in folder.iterdir():
                rest = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
                if _TEMPORARY.fullmatch(rest) and entry.is_file() and not entry.is_symlink():
                    entry.unlink(missing_ok=True)
                elif _LEFT_FOLDER.fullmatch(rest) and entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def output_lock(output: Path | str, *derived: Path) -> Iterator[OutputLock]:
    """Hold `output`'s lock for the block, after clearing the temporary files killed runs left beside `output` and
    the `derived` files written with it (a sidecar, a progress record)."""
    with OutputLock(output) as lock:
        lock.clear_temporaries(lock.output, *derived)
        yield lock
