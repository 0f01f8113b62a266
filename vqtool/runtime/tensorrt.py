"""Native TensorRT engines: availability checks, engine metadata, and a runner (torch-free).

Device memory and copies go through cuda-python, so running an engine needs neither PyTorch nor
ONNX Runtime. Written against the TensorRT 10 and 11 Python APIs (only calls both keep) and
type-checked with tensorrt-stubs.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from vqtool.errors import VqtoolError
from vqtool.runtime.base import GraphToOpen, Runner

if TYPE_CHECKING:
    import tensorrt as trt

INSTALL_HINT = (
    "on a machine with an NVIDIA GPU and driver, pip install 'vqtool[trt]' (CUDA 13, driver r580 or later) "
    "or 'vqtool[trt-cu12]' (CUDA 12)"
)
# Engines accept a dynamic batch in this range unless export --batch-min/--batch-opt/--batch-max say otherwise;
# ONNX Runtime's TensorRT provider is given the same profile, so neither rebuilds for a new batch size.
DEFAULT_BATCH_PROFILE = (1, 64, 256)


def import_tensorrt() -> ModuleType:  # the real module; callers then `import tensorrt` for typed access
    """The real `tensorrt` module, or one sentence saying what is missing and how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise VqtoolError(f"TensorRT is needed but is not installed ({exc}); {INSTALL_HINT}") from None
    # tensorrt-stubs installs a stub-only `tensorrt` folder that imports as an empty namespace package.
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        raise VqtoolError(f"TensorRT is needed but only its type stubs are installed, not the library; {INSTALL_HINT}")
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise VqtoolError(
            f"TensorRT {trt.__version__} is installed but vqtool needs TensorRT 10 or later; {INSTALL_HINT}"
        )
    return trt


@functools.cache
def trt_logger() -> trt.ILogger:
    """One logger for the process: TensorRT expects a single logger shared by every builder and runtime."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def import_cudart() -> Any:
    """cuda-python's runtime bindings: cuda.bindings.runtime since 12.6.1; the old cuda.cudart is gone in 13."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise VqtoolError(
                f"TensorRT engines need cuda-python for device memory, which is not installed; {INSTALL_HINT}"
            ) from None
    return cudart


def cuda_error_text(error: Any) -> str:
    """'cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version'."""
    cudart = import_cudart()
    try:
        name = cudart.cudaGetErrorName(error)[1]
        text = cudart.cudaGetErrorString(error)[1]
    except Exception:  # noqa: BLE001 - the error's own name is still worth reporting
        return str(error)
    return f"{name.decode() if isinstance(name, bytes) else name}: {text.decode() if isinstance(text, bytes) else text}"


def _cuda_call(result: Any, what: str) -> Any:
    """cuda-python returns (error, *values); raise on an error, return the values."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise VqtoolError(f"CUDA call {what} failed: {cuda_error_text(error)}")
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    compute_capability: str


def current_gpu() -> GpuIdentity:
    """The GPU an engine would build or run on, or one sentence saying there is none."""
    cudart = import_cudart()
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0:
        # The runtime's own words (an old driver for this CUDA, no driver, no device) say what to fix.
        raise VqtoolError(f"TensorRT needs a CUDA GPU, but CUDA cannot start here ({cuda_error_text(error)})")
    if not count:
        raise VqtoolError("TensorRT needs a CUDA GPU, but none is visible here")
    props = _cuda_call(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuIdentity(name.strip("\0 "), f"{props.major}.{props.minor}")


def require_tensorrt_gpu() -> tuple[ModuleType, GpuIdentity]:
    """Check everything an engine build needs before any work starts."""
    trt = import_tensorrt()
    return trt, current_gpu()


@dataclass(frozen=True)
class EngineMetadata:
    """What built an engine; stored beside it as ENGINE.json and checked before it runs."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    input: str
    output: str
    profile_min: list[int]
    profile_opt: list[int]
    profile_max: list[int]
    onnx_file: str
    onnx_sha256: str
    engine_sha256: str
    workspace_bytes: int
    strongly_typed: bool
    tf32: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metadata_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def read_engine_metadata(engine_path: Path) -> EngineMetadata:
    path = metadata_path(engine_path)
    try:
        return EngineMetadata(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise VqtoolError("engine has no build record beside it; rebuild with vqtool export --trt", path) from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise VqtoolError(f"corrupt engine build record ({exc}); rebuild with vqtool export --trt", path) from None


def check_engine_matches(meta: EngineMetadata, trt_version: str, gpu: GpuIdentity, engine_path: Path) -> None:
    """Engines are tied to the TensorRT version and GPU that built them: refuse any other."""
    if meta.tensorrt_version != trt_version:
        raise VqtoolError(
            f"built with TensorRT {meta.tensorrt_version}, but TensorRT {trt_version} is installed; "
            "rebuild it with vqtool export --trt",
            engine_path,
        )
    if (meta.gpu_name, meta.compute_capability) != (gpu.name, gpu.compute_capability):
        raise VqtoolError(
            f"built for {meta.gpu_name} (sm {meta.compute_capability}), but this GPU is {gpu.name} "
            f"(sm {gpu.compute_capability}); rebuild it with vqtool export --trt",
            engine_path,
        )


class TensorRTRunner:
    """One engine, one execution context, device buffers reused across batches of the same size."""

    backend = "tensorrt"

    def __init__(self, engine_path: Path) -> None:
        from vqtool.formats.manifest import sha256_file

        import_tensorrt()
        import tensorrt as trt

        self.cudart = import_cudart()
        gpu = current_gpu()
        meta = read_engine_metadata(engine_path)
        check_engine_matches(meta, str(trt.__version__), gpu, engine_path)
        if sha256_file(engine_path) != meta.engine_sha256:
            raise VqtoolError("engine does not match its build record's checksum; rebuild it", engine_path)
        self.meta = meta
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.stream: Any = None
        self.runtime = trt.Runtime(trt_logger())
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise VqtoolError("TensorRT could not deserialize this engine; rebuild it", engine_path)
        context = self.engine.create_execution_context()
        if context is None:  # TensorRT returns None (its log says why), e.g. out of device memory
            raise VqtoolError("TensorRT could not create an execution context for this engine", engine_path)
        self.context = context
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(meta.input)))  # type: ignore[no-untyped-call]
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(meta.output)))  # type: ignore[no-untyped-call]
        self.stream = _cuda_call(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.provider = f"TensorRT {trt.__version__} on {gpu.name}"
        # One execution context, stream and set of buffers: calls from several threads take turns.
        self.lock = threading.Lock()
        self.min_batch, self.max_batch = meta.profile_min[0], meta.profile_max[0]

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _cuda_call(self.cudart.cudaFree(pointer), "cudaFree")
            pointer = _cuda_call(self.cudart.cudaMalloc(nbytes), "cudaMalloc")
            self.buffers[name] = (pointer, nbytes)
        return int(pointer)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        count = len(batch)
        if count < self.min_batch:
            # A tail smaller than the profile's smallest batch: pad it with copies of its last row, drop them after.
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.min_batch - count, axis=0)])
        batch = np.ascontiguousarray(batch)
        if not self.context.set_input_shape(self.meta.input, batch.shape):
            raise VqtoolError(
                f"input shape {batch.shape} is outside the engine's profile "
                f"{self.meta.profile_min}..{self.meta.profile_max}; rebuild with other --batch-*"
            )
        dims = self.context.get_tensor_shape(self.meta.output)
        out_shape = tuple(int(dims[i]) for i in range(len(dims)))
        result = np.empty(out_shape, dtype=self.output_dtype)
        source = self._device_buffer(self.meta.input, batch.nbytes)
        target = self._device_buffer(self.meta.output, result.nbytes)
        h2d, d2h = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda_call(self.cudart.cudaMemcpyAsync(source, batch.ctypes.data, batch.nbytes, h2d, self.stream), "H2D copy")
        self.context.set_tensor_address(self.meta.input, source)
        self.context.set_tensor_address(self.meta.output, target)
        if not self.context.execute_async_v3(int(self.stream)):
            raise VqtoolError("TensorRT execution failed")
        _cuda_call(self.cudart.cudaMemcpyAsync(result.ctypes.data, target, result.nbytes, d2h, self.stream), "D2H")
        _cuda_call(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return result[:count]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != self.input_dtype:
            raise VqtoolError(
                f"the engine's input {self.meta.input} is {self.input_dtype}, but {batch.dtype} was given"
            )
        if len(batch) == 0:
            raise VqtoolError("an empty batch was given")
        with self.lock:
            if len(batch) <= self.max_batch:
                return self._run(batch)
            return np.concatenate(
                [self._run(batch[s : s + self.max_batch]) for s in range(0, len(batch), self.max_batch)]
            )

    def describe(self) -> str:
        return f"{self.provider} ({self.meta.precision} engine)"

    def pipelined(self) -> Runner:
        return self

    def close(self) -> None:
        """Free the device buffers and the stream; the runner cannot run afterwards."""
        for pointer, _ in self.buffers.values():
            self.cudart.cudaFree(pointer)
        self.buffers = {}
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self) -> None:
        if hasattr(self, "buffers"):  # __init__ may have stopped before there was anything to free
            self.close()


def load(graph: GraphToOpen) -> TensorRTRunner:
    """The runtime table's loader for a native TensorRT engine that `vqtool export --trt` built beside the graph."""
    from vqtool.formats.manifest import engine_path

    export_dir, _ = graph.export()
    path = engine_path(export_dir, graph.role, graph.precision)
    if not path.is_file():
        import_tensorrt()  # a missing TensorRT is the more useful message
        build = "build one with vqtool export CHECKPOINT --trt"
        raise VqtoolError(f"no {graph.precision} TensorRT engine here; {build}", path)
    return TensorRTRunner(path)
