"""Running an exported graph: one small interface, and the ONNX Runtime implementation (torch-free)."""

from __future__ import annotations

import contextlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vqtool.cores import inference_lanes
from vqtool.errors import VqtoolError, first_line, missing_extra

DEVICES = ("auto", "cpu", "cuda")
CUDA_PROVIDERS = ("CUDAExecutionProvider",)
TRT_PROVIDER = "TensorrtExecutionProvider"


class Runner(Protocol):
    """Runs one graph on a batch; says which backend and execution provider really ran it."""

    backend: str
    provider: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str: ...


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise missing_extra("running exported graphs", "onnxruntime", "gpu") from None
    return onnxruntime


def requested_providers(device: str, available: list[str]) -> list[str]:
    """Execution providers to ask ONNX Runtime for, best first; the CPU is always the fallback."""
    if device == "tensorrt":
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
class TrtProfile:
    """The input shapes ONNX Runtime's TensorRT provider builds its engine for: the export's batch range."""

    input: str
    tail: tuple[int, ...]
    batches: tuple[int, int, int]

    def options(self) -> dict[str, str]:
        """trt_profile_min_shapes=images:1x32x32x3 and its opt and max twins."""
        return {
            f"trt_profile_{key}_shapes": f"{self.input}:" + "x".join(str(d) for d in (batch, *self.tail))
            for key, batch in zip(("min", "opt", "max"), self.batches, strict=True)
        }


def provider_failure(narration: str) -> str | None:
    """The reason in ONNX Runtime's 'EP Error <where> <why> when using [...]' printout, without its source location."""
    match = re.search(r"^EP Error (?:\S+:\d+ [^(]*\([^)]*\) )?(.*?)\s+when using", narration, re.DOTALL | re.MULTILINE)
    return " ".join(match[1].split()) if match else None


def _session_options(ort: Any, threads: int, spin: bool) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime logs its own failed provider starts at length; we report the outcome in one line.
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


class OnnxRuntimeRunner:
    """An ONNX Runtime session over one graph, with the provider that actually started.

    On the CPU a batch is split into `lanes` parts run at once, each on one thread, rather than run
    whole on ONNX Runtime's intra-op threads: those meet at a barrier after every operator, and an
    operator on a 32x32 image takes microseconds, so they spent much of a batch waiting for each other
    (or, spinning, took the cores that image readers need). Measured on 2 cores (AMD EPYC), images/s at
    batch 256, lanes against intra-op threads spinning / sleeping: default decoder 22.1k against 16.9k /
    15.6k, INT8 encoder 65.0k against 59.5k / 47.6k, FP32 encoder 25.5k against 24.7k / 24.1k; folder encode
    INT8 beside two reader processes 26.7k against 22.0k. Below LANE_MIN_BATCH images spinning threads
    answer sooner (encoder at batch 1: 17.5k against 10.9k), so with `spin` such batches run whole on a
    second session whose idle threads spin; pipelines, whose readers need the cores, go without it.
    """

    backend = "onnxruntime"
    LANE_MIN_BATCH = 16

    def __init__(
        self,
        path: Path,
        device: str = "auto",
        threads: int | None = None,
        trt_cache: Path | None = None,
        trt_profile: TrtProfile | None = None,
        spin: bool = False,
    ) -> None:
        ort = _onnxruntime()
        self.path, self.threads = path, threads
        # One intra-op thread: the CPU's parallelism comes from lanes (see the class docstring); on a GPU
        # the CPU runs only the few operators the device provider leaves it.
        options = _session_options(ort, threads=1, spin=False)
        ort.set_default_logger_severity(4)
        self.requested = requested_providers(device, ort.get_available_providers())
        # TF32 rounds FP32 convolution inputs to 10 mantissa bits on Ampere and later: FP32 codes would
        # stop matching PyTorch's, so FP32 graphs run with it off (as TensorRT builds do).
        providers: list[str | tuple[str, dict[str, str]]] = [
            (p, {"use_tf32": "0"}) if p in CUDA_PROVIDERS else p for p in self.requested
        ]
        if self.requested[0] != "CPUExecutionProvider":
            # Before the first GPU session of the process; a value the user set is kept (and reported).
            os.environ.setdefault(TF32_OVERRIDE, "0")
        if device == "tensorrt":
            trt_options = trt_profile.options() if trt_profile is not None else {}
            if trt_cache is not None:
                # Engines built by the TensorRT EP take minutes; cache them (and their timings) beside the export.
                trt_options |= {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(trt_cache),
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": str(trt_cache),
                }
            providers[0] = (TRT_PROVIDER, trt_options)
        # ONNX Runtime prints a provider that fails to start (and its fallback) on stdout, where command results
        # go: keep that text as the reason instead.
        narration = io.StringIO()
        try:
            with contextlib.redirect_stdout(narration):
                self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors for unreadable graphs
            raise VqtoolError(f"ONNX Runtime cannot load this graph ({first_line(exc)})", path) from None
        self.provider = self.session.get_providers()[0]
        why = provider_failure(narration.getvalue())
        if device == "cuda" and self.provider not in CUDA_PROVIDERS:
            raise VqtoolError(
                "--device cuda: ONNX Runtime's CUDAExecutionProvider is installed but could not start "
                f"({why or 'no GPU or CUDA libraries here'}); use --device cpu"
            )
        if device == "tensorrt" and self.provider != TRT_PROVIDER:
            raise VqtoolError(
                "ONNX Runtime's TensorrtExecutionProvider is listed but could not start "
                f"({why or 'it needs a CUDA GPU and the TensorRT libraries'}); use another --backend"
            )
        self.input_name = self.session.get_inputs()[0].name
        self.version = ort.__version__
        self.lanes = inference_lanes(threads) if self.provider == "CPUExecutionProvider" else 1
        self._lane_pool = ThreadPoolExecutor(self.lanes - 1, "vqtool-lane") if self.lanes > 1 else None
        self._whole = None
        if spin and self.lanes > 1:
            whole = _session_options(ort, threads=self.lanes, spin=True)
            self._whole = ort.InferenceSession(str(path), sess_options=whole, providers=["CPUExecutionProvider"])

    def without_spinning(self) -> OnnxRuntimeRunner:
        """This graph without the spinning session for small batches: for pipelines beside reader processes."""
        if self._whole is None:
            return self
        return OnnxRuntimeRunner(self.path, "cpu", threads=self.threads, spin=False)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        result: np.ndarray = self.session.run(None, {self.input_name: batch})[0]
        return result

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._whole is not None and len(batch) < self.LANE_MIN_BATCH:
            small: np.ndarray = self._whole.run(None, {self.input_name: batch})[0]
            return small
        parts = min(self.lanes, len(batch))
        if self._lane_pool is None or parts < 2:
            return self._run(batch)
        chunks = np.array_split(batch, parts)
        # The caller's thread runs the first part itself: lanes - 1 pool threads serve the rest.
        others = [self._lane_pool.submit(self._run, chunk) for chunk in chunks[1:]]
        first = self._run(chunks[0])
        return np.concatenate([first, *(other.result() for other in others)])

    def close(self) -> None:
        if self._lane_pool is not None:
            self._lane_pool.shutdown(wait=False)

    def describe(self) -> str:
        fell_back = [p for p in self.requested if p != "CPUExecutionProvider" and p != self.provider]
        note = f" ({', '.join(fell_back)} listed but could not start)" if fell_back else ""
        if self.provider == TRT_PROVIDER and os.environ.get(TF32_OVERRIDE) != "0":
            note += f" (TF32 may be on: {TF32_OVERRIDE} is {os.environ.get(TF32_OVERRIDE)!r}, not '0')"
        lanes = f", {self.lanes} lanes" if self.lanes > 1 else ""
        return f"ONNX Runtime {self.version} on {self.provider}{lanes}{note}"
