"""How a file pipeline shares the CPU between image-file worker processes and inference threads.

Inference keeps ONNX Runtime's default of one thread per core; the workers that read or write image
files are lowered in priority, so they take what inference leaves idle (its threads wait at every
batch boundary) instead of preempting it. Measured on 2 cores with 10,000 32x32 PNG files:
  encode FP32  2 threads + 2 niced readers: 8.2-8.5k images/s; 1 thread + 1 reader: 5.7-6.2k;
               2 threads + 2 readers at normal priority: 7.4k
  encode INT8  2 threads + 2 niced readers: 13.7k; 1 thread + 1 reader: 14.8-15.0k
  decode FP32  2 threads + 1 niced writer: 6.5k (to RAM); 2 writers: 6.0k; 1 thread + 1 writer: 5.5-5.8k
Reading costs about three times what writing does per image, hence more readers than writers.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import re
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from vqtool.errors import VqtoolError

MAX_WORKERS = 16
WORKER_NICENESS = 10


def _cores() -> int:
    return os.cpu_count() or 1


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
    """ONNX Runtime's intra-op threads on the CPU; None keeps its default (one per core)."""
    return _checked("--threads", requested)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Processes for image-file work, started with worker_init.

    Fork where available: workers touch only Pillow and NumPy, never the runtime's threads, and spawn
    would re-import the caller's main module (breaking scripts without a __main__ guard).
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=worker_init)


def worker_init() -> None:
    """Run in each file worker: Ctrl-C is the parent's to handle, and inference threads get the cores first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # else every worker prints its own KeyboardInterrupt
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
