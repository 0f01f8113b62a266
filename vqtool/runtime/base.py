"""What every runtime shares: the Runner interface, the names of backends and devices, and the one table of runtimes
(which precisions each runs is the precision table's, vqtool.precisions).

`auto`, `vqtool bench`, `vqtool parity`, export's parity and the command line's choices all read RUNTIMES;
a new runtime is a row here and a module beside this one (docs/architecture.md).
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from vqtool.formats.manifest import LATENT_ROLES
from vqtool.precisions import ENCODER_ONLY, FP32, PRECISIONS
from vqtool.precisions import ROWS as PRECISION_ROWS
from vqtool.precisions import row as precision_row

if TYPE_CHECKING:
    import numpy as np

    from vqtool.formats.manifest import Manifest


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
class GraphToOpen:
    """What a runtime's loader opens: one graph file (already checked against its export's manifest, or written
    aside by export and parity), the role and precision it runs at, the device (the runtime's own, or auto where
    the backend picks), the CPU threads, and the export it belongs to where the runtime needs more of it (the
    PyTorch file, the TensorRT engines)."""

    path: Path | None  # None for a runtime that runs no graph file (Runtime.reads_graph)
    role: str
    precision: str
    device: str = "auto"
    threads: int | None = None
    # Spinning threads for small in-memory batches (ONNX Runtime; see OnnxRuntimeRunner).
    spin: bool = False
    # The largest activation of one image in the graph: large graphs run on intra-op threads (manifest.py).
    activation_bytes: int = 0
    export_dir: Path | None = None
    manifest: Manifest | None = None

    def export(self) -> tuple[Path, Manifest]:
        """The export folder and manifest, for the runtimes that open more of an export than one graph."""
        if self.export_dir is None or self.manifest is None:
            raise ValueError(f"{self.path}: this runtime opens an export, not a graph alone")
        return self.export_dir, self.manifest


@dataclass(frozen=True)
class Runtime:
    """One backend on one device; `loader` names the function that opens its runner ("module:function", imported
    on first use, so that an optional library is needed only where it runs); `auto_rank` orders auto's GPU tries.
    `engine_files`: it deserializes TensorRT engines from the export folder, which are code, not data. The
    precisions it runs are the precision table's."""

    backend: str
    device: str
    loader: str
    auto_rank: int | None = None
    engine_files: bool = False
    # Whether it runs the export's ONNX graph (checked before it opens); PyTorch runs model.pt, TensorRT an engine.
    reads_graph: bool = True

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions it runs (vqtool.precisions: each precision's row names its runtimes)."""
        return tuple(p for p in PRECISIONS if (self.backend, self.device) in precision_row(p).runtimes)

    def open(self, graph: GraphToOpen) -> Runner:
        """Start this runtime's runner on `graph`; refused in one sentence where it cannot start here."""
        module, name = self.loader.split(":")
        load: Callable[[GraphToOpen], Runner] = getattr(importlib.import_module(module), name)
        return load(graph)


# In bench's order: eager PyTorch on the CPU first, the baseline every ratio is taken against. ONNX Runtime's CPU
# provider runs FP16 graphs by emulation (casts around FP32 kernels): it runs them, slower than FP32.
_TORCH, _ORT = "vqtool.runtime.pytorch:load", "vqtool.runtime.onnxruntime:load"
_OPENVINO = "vqtool.runtime.openvino:load"
RUNTIMES = (
    Runtime(REFERENCE, Device.cpu.value, _TORCH, reads_graph=False),
    Runtime(Backend.onnxruntime.value, Device.cpu.value, _ORT, auto_rank=3),
    Runtime(Backend.openvino.value, Device.cpu.value, _OPENVINO, auto_rank=3),
    Runtime(REFERENCE, Device.cuda.value, _TORCH, reads_graph=False),
    Runtime(Backend.onnxruntime.value, Device.cuda.value, _ORT, auto_rank=2),
    Runtime(
        Backend.onnxruntime_trt.value,
        Device.cuda.value,
        "vqtool.runtime.onnxruntime:load_with_tensorrt",
        engine_files=True,
    ),
    Runtime(
        Backend.tensorrt.value,
        Device.cuda.value,
        "vqtool.runtime.tensorrt:load",
        auto_rank=1,
        engine_files=True,
        reads_graph=False,
    ),
)
_NAMED = {(r.backend, r.device) for r in RUNTIMES}


def runtime_for(backend: str, device: str) -> Runtime:
    """The table's row for `backend` on `device`; with device auto, the backend's first row (its loader then picks
    the device, as ONNX Runtime and PyTorch do)."""
    rows = [r for r in RUNTIMES if r.backend == backend and device in (Device.auto.value, r.device)]
    if not rows:
        raise ValueError(f"no runtime {backend} on {device}")
    return rows[0]


if any(pair not in _NAMED for row in PRECISION_ROWS for pair in row.runtimes):
    raise AssertionError("the precision table names a runtime that RUNTIMES has no row for")
# The backends that run engine files: an export opened with engines=False (--no-engines) never starts them.
ENGINE_BACKENDS = frozenset(r.backend for r in RUNTIMES if r.engine_files)
# The backends parity compares with the reference (the command line's --backend of parity and bench): every one,
# PyTorch's own included (on CUDA, and at the precisions it autocasts to); only its FP32 on the CPU is the reference.
CHECKED_BACKENDS = tuple(dict.fromkeys(r.backend for r in RUNTIMES))
if TYPE_CHECKING:
    CheckedBackend = Backend
else:
    CheckedBackend = enum.Enum("CheckedBackend", {b.replace("-", "_"): b for b in CHECKED_BACKENDS}, type=str)


def runs(backend: str, precision: str, device: str | None = None) -> bool:
    """Whether `backend` runs `precision` (on `device`, or on any device)."""
    return any(r.backend == backend and precision in r.precisions and device in (None, r.device) for r in RUNTIMES)


def is_reference(backend: str, device: str, precision: str) -> bool:
    """Whether this runtime is the reference itself: PyTorch's FP32 on the CPU, which parity compares every other
    runtime with (PyTorch's own reduced precisions and CUDA included) and bench times every other against."""
    return (backend, device, precision) == (REFERENCE, Device.cpu.value, FP32)


def backends_running(precision: str, device: str) -> tuple[str, ...]:
    """The backends that run `precision` on `device`, in the table's order."""
    return tuple(dict.fromkeys(r.backend for r in RUNTIMES if r.device == device and precision in r.precisions))


def refusal(role: str, backend: str, device: str, precision: str) -> str | None:
    """Why `backend` (auto: any) cannot run `role` at `precision` on `device` (auto: any), in one sentence, or None."""
    if role in LATENT_ROLES:
        latent_precisions = [p for p in PRECISIONS if precision_row(p).latents is not None]
        if precision not in latent_precisions:
            return f"latent graphs run at {' or '.join(latent_precisions)}, not {precision}"
    elif precision in ENCODER_ONLY and role != "encoder":
        return f"--precision {precision} is for encoding only; decode with fp32 or fp16"
    rows = [r for r in RUNTIMES if precision in r.precisions]
    devices, backends = {r.device for r in rows}, tuple(dict.fromkeys(r.backend for r in rows))
    if len(backends) == 1 and backend not in (Backend.auto.value, *backends):
        return f"--precision {precision} runs on {LABELS[backends[0]]} only; use --backend {backends[0]}"
    elsewhere = device not in (Device.auto.value, *devices) or backend not in (Backend.auto.value, *backends)
    if len(devices) == 1 and elsewhere:
        use = f"use --backend {' or '.join(backends)}"
        own_devices = {r.device for r in RUNTIMES if r.backend == backend}
        if device in (Device.auto.value, *devices) and devices <= own_devices:  # the backend runs there, not this
            return f"--precision {precision} runs on {' or '.join(LABELS.get(b, b) for b in backends)} only; {use}"
        return f"--precision {precision} runs {_where(devices)} only; {use}"
    if backend == Backend.auto.value:
        return None
    own = [r for r in RUNTIMES if r.backend == backend]
    if device != Device.auto.value and device not in {r.device for r in own}:
        other = own[0].device
        return f"--backend {backend} runs {_where({other})} only; use --device {other} or auto"
    offered = [p for p in PRECISIONS if any(p in r.precisions for r in own)]
    if precision in offered:
        there = {r.device for r in own if precision in r.precisions}
        if device not in (Device.auto.value, *there):
            return f"--backend {backend} runs {precision} {_where(there)} only; use --device {there.pop()}"
        return None
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


@runtime_checkable
class CudaTensorRunner(Protocol):
    """A runner that can run a CUDA torch tensor where it lies (ONNX Runtime's CUDA and TensorRT providers, through
    I/O binding): the API hands it CUDA tensors without a copy through the host."""

    @property
    def on_cuda(self) -> bool:
        """Whether this runner's graph runs on the GPU, so that a CUDA tensor can be bound where it is."""
        ...

    def run_cuda(self, tensor: Any, out_shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """The graph over a CUDA tensor, its result a new CUDA tensor of `out_shape` and `dtype`."""
        ...
