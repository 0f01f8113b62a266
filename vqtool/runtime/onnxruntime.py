"""The ONNX Runtime runner: CPU (in lanes), CUDA and ONNX Runtime's TensorRT provider (torch-free)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.errors import VqtoolError, first_line
from vqtool.formats.manifest import LARGE_ACTIVATION_BYTES, ORT_TRT_CACHE, Manifest, engine_path, graph_key
from vqtool.host import inference_lanes
from vqtool.runtime import tensors
from vqtool.runtime.base import DEVICES, GraphToOpen, Runner

CUDA_PROVIDERS = ("CUDAExecutionProvider",)
TRT_PROVIDER = "TensorrtExecutionProvider"


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise VqtoolError(
            "running exported graphs needs onnxruntime, which is not installed: pip install vqtool"
        ) from None
    return onnxruntime


def requested_providers(device: str, available: list[str], tensorrt: bool = False) -> list[str]:
    """Execution providers to ask ONNX Runtime for, best first; the CPU is always the fallback."""
    if tensorrt:
        if TRT_PROVIDER not in available:
            raise VqtoolError("this onnxruntime build has no TensorrtExecutionProvider; pip install onnxruntime-gpu")
        return [TRT_PROVIDER, *CUDA_PROVIDERS, "CPUExecutionProvider"]
    if device not in DEVICES:
        raise VqtoolError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    wanted = [] if device == "cpu" else [p for p in CUDA_PROVIDERS if p in available]
    if device == "cuda" and not wanted:
        raise VqtoolError("--device cuda needs onnxruntime-gpu with CUDAExecutionProvider, which this install lacks")
    return [*wanted, "CPUExecutionProvider"]


# CUDA reads this when it starts in the process: "0" keeps TF32 off for every kernel, the only way to do so for
# ONNX Runtime's TensorRT provider, which has no TF32 option (CUDA's provider has use_tf32, set below).
TF32_OVERRIDE = "NVIDIA_TF32_OVERRIDE"


@dataclass(frozen=True)
class TrtOptions:
    """What ONNX Runtime's TensorRT provider builds its engine for (the export's batch range at the model's size),
    and the folder it caches engines and timings in."""

    input: str
    tail: tuple[int, ...]
    batches: tuple[int, int, int]
    cache: Path | None = None

    @classmethod
    def for_export(cls, export_dir: Path, manifest: Manifest, role: str, precision: str) -> TrtOptions:
        """The batch range of the export's own TensorRT engine if it has one, else the default one."""
        from vqtool.runtime.tensorrt import DEFAULT_BATCH_PROFILE, read_engine_metadata

        entry = manifest.graphs[graph_key(role, precision)]
        size, grid = manifest.image_size, manifest.grid
        tail = (size, size, 3) if role == "encoder" else (grid, grid)
        batches = DEFAULT_BATCH_PROFILE
        engine = engine_path(export_dir, role, precision)
        if engine.is_file():
            meta = read_engine_metadata(engine)
            batches = (meta.profile_min[0], meta.profile_opt[0], meta.profile_max[0])
        return cls(entry.input, tail, batches, export_dir / ORT_TRT_CACHE)

    def profile_options(self) -> dict[str, str]:
        """trt_profile_min_shapes=images:1x32x32x3 and its opt and max twins."""
        return {
            f"trt_profile_{key}_shapes": f"{self.input}:" + "x".join(str(d) for d in (batch, *self.tail))
            for key, batch in zip(("min", "opt", "max"), self.batches, strict=True)
        }

    def provider_options(self) -> dict[str, str]:
        """The profile, and the caches where there is a folder for them."""
        options = self.profile_options()
        if self.cache is not None:
            # Engines built by the TensorRT EP take minutes; cache them (and their timings) beside the export.
            options |= {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(self.cache),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(self.cache),
            }
        return options


def provider_failure(narration: str) -> str | None:
    """The reason in ONNX Runtime's 'EP Error <where> <why> when using [...]' printout, without its source location."""
    match = re.search(r"^EP Error (?:\S+:\d+ [^(]*\([^)]*\) )?(.*?)\s+when using", narration, re.DOTALL | re.MULTILINE)
    return " ".join(match[1].split()) if match else None


def _session_options(ort: Any, threads: int, spin: bool, plan_memory: bool = True) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime's memory pattern allocates a run's tensors as one planned block; at 256 x 256 images that
    # block held 1.6x the memory of allocating them as they live, and ran no faster (docs/performance.md).
    options.enable_mem_pattern = plan_memory
    # ONNX Runtime logs its own failed provider starts at length; we report the outcome in one line.
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


class OnnxRuntimeRunner:
    """An ONNX Runtime session over one graph, with the provider that actually started.

    On the CPU a batch is split into `lanes` parts run at once, each on one thread, rather than run whole on
    ONNX Runtime's intra-op threads: those meet at a barrier after every operator, and an operator on a small
    image takes microseconds, so they spend much of a batch waiting for each other (or, spinning, take the
    cores that image readers need). Below LANE_MIN_BATCH images spinning threads answer sooner, so with `spin`
    such batches run whole on a second session whose idle threads spin, opened on the first such batch;
    pipelines, whose readers need the cores, run `pipelined()`, which never opens it.
    A graph whose largest activation per image (`activation_bytes`, from the manifest) reaches
    LARGE_ACTIVATION_BYTES runs every batch whole on intra-op threads instead: its operators take milliseconds,
    so threads meeting after each cost little, and the activation budget gives it batches of one or two images,
    which lanes would leave to one core. It also runs without ONNX Runtime's memory pattern.
    docs/design-measurements.md has the measurements behind these choices.
    """

    backend = "onnxruntime"
    LANE_MIN_BATCH = 16

    def __init__(
        self,
        path: Path,
        device: str = "auto",
        threads: int | None = None,
        *,
        spin: bool = False,
        tensorrt: TrtOptions | None = None,
        activation_bytes: int = 0,
    ) -> None:
        ort = _onnxruntime()
        self.path, self.spin = path, spin
        self.large = activation_bytes >= LARGE_ACTIVATION_BYTES
        ort.set_default_logger_severity(4)
        self.requested = requested_providers(device, ort.get_available_providers(), tensorrt is not None)
        self.intra_op_threads = inference_lanes(threads) if self.large else 1
        self.session, self.provider = self._start(ort, device, tensorrt)
        self.input_name = self.session.get_inputs()[0].name
        self.version = ort.__version__
        cpu = self.provider == "CPUExecutionProvider"
        self.lanes = inference_lanes(threads) if cpu and not self.large else 1
        self._lane_pool = ThreadPoolExecutor(self.lanes - 1, "vqtool-lane") if self.lanes > 1 else None
        self._whole: Any = None
        self._whole_lock = threading.Lock()

    def _start(self, ort: Any, device: str, tensorrt: TrtOptions | None) -> tuple[Any, str]:
        """The lanes' session on the best provider that starts; refused in one line where the one asked for fails."""
        # TF32 rounds FP32 convolution inputs to 10 mantissa bits on Ampere and later: FP32 codes would
        # stop matching PyTorch's, so FP32 graphs run with it off (as TensorRT builds do).
        providers: list[str | tuple[str, dict[str, str]]] = [
            (p, {"use_tf32": "0"}) if p in CUDA_PROVIDERS else p for p in self.requested
        ]
        if self.requested[0] != "CPUExecutionProvider":
            # Before the first GPU session of the process; a value the user set is kept (and reported).
            os.environ.setdefault(TF32_OVERRIDE, "0")
        if tensorrt is not None:
            providers[0] = (TRT_PROVIDER, tensorrt.provider_options())
        # One intra-op thread unless the graph is large: the CPU's parallelism comes from lanes (see the class
        # docstring); on a GPU the CPU runs only the few operators the device provider leaves it.
        options = _session_options(ort, threads=self.intra_op_threads, spin=False, plan_memory=not self.large)
        # ONNX Runtime prints a provider that fails to start (and its fallback) on stdout, where command results
        # go: keep that text as the reason instead.
        narration = io.StringIO()
        try:
            with contextlib.redirect_stdout(narration):
                session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors for unreadable graphs
            raise VqtoolError(f"ONNX Runtime cannot load this graph ({first_line(exc)})", self.path) from None
        provider = session.get_providers()[0]
        why = provider_failure(narration.getvalue())
        if device == "cuda" and tensorrt is None and provider not in CUDA_PROVIDERS:
            raise VqtoolError(
                "--device cuda: ONNX Runtime's CUDAExecutionProvider is installed but could not start "
                f"({why or 'no GPU or CUDA libraries here'}); use --device cpu"
            )
        if tensorrt is not None and provider != TRT_PROVIDER:
            raise VqtoolError(
                "ONNX Runtime's TensorrtExecutionProvider is listed but could not start "
                f"({why or 'it needs a CUDA GPU and the TensorRT libraries'}); use another --backend"
            )
        return session, provider

    def _whole_session(self) -> Any:
        """The session with spinning intra-op threads that small batches run on, opened on the first one (only
        where there are lanes, so never for a large graph)."""
        with self._whole_lock:
            if self._whole is None:
                ort = _onnxruntime()
                options = _session_options(ort, threads=self.lanes, spin=True)
                self._whole = ort.InferenceSession(
                    str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
                )
            return self._whole

    def _run(self, batch: np.ndarray) -> np.ndarray:
        result: np.ndarray = self.session.run(None, {self.input_name: batch})[0]
        return result

    def in_lanes(self, batch: np.ndarray) -> np.ndarray:
        """The batch split across the lanes, each part on one thread (the whole batch where there is one lane)."""
        parts = min(self.lanes, len(batch))
        if self._lane_pool is None or parts < 2:
            return self._run(batch)
        chunks = np.array_split(batch, parts)
        # The caller's thread runs the first part itself: lanes - 1 pool threads serve the rest.
        others = [self._lane_pool.submit(self._run, chunk) for chunk in chunks[1:]]
        first = self._run(chunks[0])
        return np.concatenate([first, *(other.result() for other in others)])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.spin and self.lanes > 1 and len(batch) < self.LANE_MIN_BATCH:
            small: np.ndarray = self._whole_session().run(None, {self.input_name: batch})[0]
            return small
        return self.in_lanes(batch)

    def pipelined(self) -> Runner:
        return _LanesOnly(self) if self.spin and self.lanes > 1 else self

    @property
    def on_cuda(self) -> bool:
        """Whether the graph runs on the GPU (CUDA or TensorRT provider), so that CUDA tensors can be bound."""
        return self.provider in (*CUDA_PROVIDERS, TRT_PROVIDER)

    def run_cuda(self, tensor: Any, out_shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """The graph over a CUDA tensor bound where it lies (I/O binding), its result a new CUDA tensor."""
        return tensors.run_bound(self.session, tensor, out_shape, dtype)

    def close(self) -> None:
        if self._lane_pool is not None:
            self._lane_pool.shutdown(wait=False)

    def describe(self) -> str:
        fell_back = [p for p in self.requested if p != "CPUExecutionProvider" and p != self.provider]
        note = f" ({', '.join(fell_back)} listed but could not start)" if fell_back else ""
        if self.provider == TRT_PROVIDER and os.environ.get(TF32_OVERRIDE) != "0":
            note += f" (TF32 may be on: {TF32_OVERRIDE} is {os.environ.get(TF32_OVERRIDE)!r}, not '0')"
        lanes = f", {self.lanes} lanes" if self.lanes > 1 else ""
        if self.intra_op_threads > 1 and self.provider == "CPUExecutionProvider":
            lanes = f", {self.intra_op_threads} intra-op threads"
        return f"ONNX Runtime {self.version} on {self.provider}{lanes}{note}"


class _LanesOnly:
    """An ONNX Runtime runner's sessions as a pipeline runs them: every batch in lanes, none on spinning threads."""

    def __init__(self, runner: OnnxRuntimeRunner) -> None:
        self._runner = runner
        self.backend, self.provider = runner.backend, runner.provider

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._runner.in_lanes(batch)

    def describe(self) -> str:
        return self._runner.describe()

    def pipelined(self) -> Runner:
        return self

    def close(self) -> None:
        pass  # the runner it belongs to owns the sessions


def load(graph: GraphToOpen) -> OnnxRuntimeRunner:
    """The runtime table's loader for ONNX Runtime on the CPU or CUDA (device auto: CUDA where its provider starts)."""
    assert graph.path is not None
    return OnnxRuntimeRunner(
        graph.path, graph.device, threads=graph.threads, spin=graph.spin, activation_bytes=graph.activation_bytes
    )


def load_with_tensorrt(graph: GraphToOpen) -> OnnxRuntimeRunner:
    """The runtime table's loader for ONNX Runtime's TensorRT provider, built for the export's batch profile."""
    assert graph.path is not None
    export_dir, manifest = graph.export()
    options = TrtOptions.for_export(export_dir, manifest, graph.role, graph.precision)
    return OnnxRuntimeRunner(graph.path, "cuda", spin=graph.spin, tensorrt=options)
