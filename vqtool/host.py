"""This machine: its cores, memory and GPUs, and how a run shares them between worker processes and inference.

Training, the runtimes and the file pipelines all read it (the CPU's description, whether an NVIDIA GPU is there,
the memory available, worker processes that end with their parent). Inference takes one lane per core
(OnnxRuntimeRunner splits each batch across single-threaded runs); the workers that read or write image files are
lowered in priority, so they take what inference leaves idle instead of preempting it. Reading costs about three
times what writing does per image, hence more readers than writers (docs/design-measurements.md, "Sharing the
CPU").
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import multiprocessing
import os
import re
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from vqtool.errors import VqtoolError

MAX_WORKERS = 16
# prctl's request to be sent a signal when the parent ends (linux/prctl.h).
PR_SET_PDEATHSIG = 1
WORKER_NICENESS = 10


def _cores() -> int:
    return os.cpu_count() or 1


def inference_lanes(requested: int | None = None) -> int:
    """Single-threaded runs a CPU batch is split across: --threads, else one per core."""
    return _checked("--threads", requested) or _cores()


def _checked(option: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise VqtoolError(f"{option} must be at least 1, got {value}")
    return value


def reader_count(requested: int | None = None) -> int:
    """Processes that decode image files: one per core unless asked."""
    return _checked("--readers", requested) or min(MAX_WORKERS, _cores())


def writer_count(requested: int | None = None) -> int:
    """Processes that write PNG files: one per two cores unless asked."""
    return _checked("--writers", requested) or max(1, min(MAX_WORKERS, _cores() // 2))


def inference_threads(requested: int | None = None) -> int | None:
    """CPU threads inference may use (see OnnxRuntimeRunner's lanes); None: one per core."""
    return _checked("--threads", requested)


def _start_method() -> str:
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def shared_buffer(size: int) -> mmap.mmap | None:
    """Anonymous memory that worker_pool(shared=...) workers can write and the parent read without a copy,
    or None where workers are spawned rather than forked (there they return their results pickled)."""
    return mmap.mmap(-1, size) if _start_method() == "fork" else None


# The shared buffer as a forked worker sees it; set by worker_init.
_worker_buffer: mmap.mmap | None = None


def worker_buffer() -> mmap.mmap:
    if _worker_buffer is None:
        raise RuntimeError("this process was not started by worker_pool(shared=...)")
    return _worker_buffer


def worker_pool(workers: int, shared: mmap.mmap | None = None) -> ProcessPoolExecutor:
    """Processes for image-file work, started with worker_init; `shared` (from shared_buffer) is mapped in each.

    Fork where available: workers touch only Pillow and NumPy, never the runtime's threads, and spawn
    would re-import the caller's main module (breaking scripts without a __main__ guard). Under fork the
    initializer's arguments are inherited, not pickled, which is how the anonymous mapping reaches workers.
    """
    context = multiprocessing.get_context(_start_method())
    return ProcessPoolExecutor(workers, mp_context=context, initializer=worker_init, initargs=(shared, os.getpid()))


def worker_init(shared: mmap.mmap | None = None, parent: int | None = None) -> None:
    """Run in each file worker: it ends with its parent, Ctrl-C is the parent's to handle, and inference threads get
    the cores first."""
    global _worker_buffer
    _worker_buffer = shared
    if parent is not None:
        end_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # else every worker prints its own KeyboardInterrupt
    lower_priority()


def end_with_parent(parent: int) -> None:
    """Have the kernel kill this process when `parent` ends, however it ends (SIGKILL, SIGBUS, ...): a helper must
    never outlive the run it helps. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)


def lower_priority() -> None:
    """Lower this worker process below inference (or a training step), so that it takes the cores they leave idle."""
    with contextlib.suppress(OSError):  # a platform without nice, or a policy that forbids it
        os.nice(WORKER_NICENESS)


@functools.cache
def cpu_description() -> str:
    """The CPU's model name and the instruction sets that decide which runtime and precision win on it."""
    model, flags = "unknown CPU", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        model = found[1].strip() if found else model
        found = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
        flags = set(found[1].split()) if found else set()
    except OSError:
        pass
    wanted = (
        ("amx_bf16", "AMX-BF16"),
        ("amx_int8", "AMX-INT8"),
        ("avx512_bf16", "AVX-512 BF16"),
        ("avx512_vnni", "AVX-512 VNNI"),
        ("avx512f", "AVX-512"),
        ("avx_vnni", "AVX-VNNI"),
        ("avx2", "AVX2"),
    )
    have = [name for flag, name in wanted if flag in flags]
    return f"{model} ({', '.join(have) if have else 'no AVX2'})"


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (MemAvailable), or None where it does not say."""
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found[1]) * 1024 if found else None


@functools.cache
def nvidia_gpu_present() -> bool:
    """Whether an NVIDIA driver exposes a GPU here: auto skips the CUDA runtimes where none does, rather than
    start a session that can only fall back (onnxruntime-gpu lists its CUDA provider on any machine)."""
    # WSL2 exposes no /dev/nvidia*: its GPUs show through /dev/dxg, NVIDIA's by the driver's libcuda beside it.
    wsl_cuda = Path("/dev/dxg").exists() and any(Path("/usr/lib/wsl/lib").glob("libcuda.so*"))
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*")) or wsl_cuda
