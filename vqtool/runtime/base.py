"""What every runtime shares: the Runner interface, the names of backends and devices, and the one table of runtimes
(which precisions each runs is the precision table's, vqtool.precisions).

`auto`, `vqtool bench`, `vqtool parity`, export's parity and the command line's choices all read RUNTIMES;
a new runtime is a row here and a module beside this one (docs/architecture.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from vqtool.precisions import ENCODER_ONLY, PRECISIONS
from vqtool.precisions import ROWS as PRECISION_ROWS
from vqtool.precisions import row as precision_row

if TYPE_CHECKING:
    import numpy as np


class Backend(str, enum.Enum):
    """What runs an export's graphs; auto picks one (vqtool.runtime.select)."""

    auto = "auto"
    onnxruntime = "onnxruntime"
    onnxruntime_trt = "onnxruntime-trt"
    tensorrt = "tensorrt"
    openvino = "openvino"
    torch = "torch"


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


BACKENDS = tuple(b.value for b in Backend)
DEVICES = tuple(d.value for d in Device)
# Parity's reference and bench's baseline: the PyTorch model itself.
REFERENCE = Backend.torch.value


@dataclass(frozen=True)
class Runtime:
    """One backend on one device; `auto_rank` orders auto's GPU tries. `engine_files`: it deserializes TensorRT
    engines from the export folder, which are code, not data. The precisions it runs are the precision table's."""

    backend: str
    device: str
    auto_rank: int | None = None
    engine_files: bool = False

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions it runs (vqtool.precisions: each precision's row names its runtimes)."""
        return tuple(p for p in PRECISIONS if (self.backend, self.device) in precision_row(p).runtimes)


# In bench's order: eager PyTorch on the CPU first, the baseline every ratio is taken against. ONNX Runtime's CPU
# provider runs FP16 graphs by emulation (casts around FP32 kernels): it runs them, slower than FP32.
RUNTIMES = (
    Runtime(REFERENCE, Device.cpu.value),
    Runtime(Backend.onnxruntime.value, Device.cpu.value, auto_rank=3),
    Runtime(Backend.openvino.value, Device.cpu.value, auto_rank=3),
    Runtime(REFERENCE, Device.cuda.value),
    Runtime(Backend.onnxruntime.value, Device.cuda.value, auto_rank=2),
    Runtime(Backend.onnxruntime_trt.value, Device.cuda.value, engine_files=True),
    Runtime(Backend.tensorrt.value, Device.cuda.value, auto_rank=1, engine_files=True),
)
_NAMED = {(r.backend, r.device) for r in RUNTIMES}
if any(pair not in _NAMED for row in PRECISION_ROWS for pair in row.runtimes):
    raise AssertionError("the precision table names a runtime that RUNTIMES has no row for")
# The backends that run engine files: an export opened with engines=False (--no-engines) never starts them.
ENGINE_BACKENDS = frozenset(r.backend for r in RUNTIMES if r.engine_files)
# The backends parity compares with the reference (the command line's --backend of parity and bench).
CHECKED_BACKENDS = tuple(dict.fromkeys(r.backend for r in RUNTIMES if r.backend != REFERENCE))
if TYPE_CHECKING:
    CheckedBackend = Backend
else:
    CheckedBackend = enum.Enum("CheckedBackend", {b.replace("-", "_"): b for b in CHECKED_BACKENDS}, type=str)


def runs(backend: str, precision: str, device: str | None = None) -> bool:
    """Whether `backend` runs `precision` (on `device`, or on any device)."""
    return any(r.backend == backend and precision in r.precisions and device in (None, r.device) for r in RUNTIMES)


def backends_running(precision: str, device: str) -> tuple[str, ...]:
    """The backends that run `precision` on `device`, in the table's order."""
    return tuple(dict.fromkeys(r.backend for r in RUNTIMES if r.device == device and precision in r.precisions))


def refusal(role: str, backend: str, device: str, precision: str) -> str | None:
    """Why `backend` (auto: any) cannot run `role` at `precision` on `device` (auto: any), in one sentence, or None."""
    if precision in ENCODER_ONLY and role != "encoder":
        return f"--precision {precision} is for encoding only; decode with fp32 or fp16"
    rows = [r for r in RUNTIMES if precision in r.precisions]
    devices, backends = {r.device for r in rows}, tuple(dict.fromkeys(r.backend for r in rows))
    if len(backends) == 1 and backend not in (Backend.auto.value, *backends):
        return f"--precision {precision} runs on {LABELS[backends[0]]} only; use --backend {backends[0]}"
    elsewhere = device not in (Device.auto.value, *devices) or backend not in (Backend.auto.value, *backends)
    if len(devices) == 1 and elsewhere:
        return f"--precision {precision} runs {_where(devices)} only; use --backend {' or '.join(backends)}"
    if backend == Backend.auto.value:
        return None
    own = [r for r in RUNTIMES if r.backend == backend]
    if device != Device.auto.value and device not in {r.device for r in own}:
        other = own[0].device
        return f"--backend {backend} runs {_where({other})} only; use --device {other} or auto"
    offered = [p for p in PRECISIONS if any(p in r.precisions for r in own)]
    if precision in offered:
        return None
    if backend == REFERENCE:
        return f"--backend {backend} runs the FP32 PyTorch model only; use --precision fp32"
    return f"--backend {backend} runs {', '.join(offered[:-1])} or {offered[-1]}; use one of those"


LABELS = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def _where(devices: set[str]) -> str:
    return "on the CPU" if devices == {Device.cpu.value} else "on a CUDA GPU"


class Runner(Protocol):
    """Runs one graph on a batch; says which backend and execution provider really ran it."""

    backend: str
    provider: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str: ...

    def pipelined(self) -> Runner:
        """This runner as a file pipeline runs it, beside reader or writer processes: the same sessions, with no
        threads that spin while idle (they would take the cores the readers need)."""
        ...

    def close(self) -> None:
        """Release what the runner holds (thread pools, GPU buffers); it is not called again afterwards."""
        ...
