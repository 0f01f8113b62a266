"""Running an exported graph: one small interface, and the ONNX Runtime implementation (torch-free)."""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

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


class OnnxRuntimeRunner:
    """An ONNX Runtime session over one graph, with the provider that actually started."""

    backend = "onnxruntime"

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
        self.path, self.threads, self.spin = path, threads, spin
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime logs its own failed provider starts at length; we report the outcome in one line.
        options.log_severity_level = 3
        ort.set_default_logger_severity(4)
        if threads:
            options.intra_op_num_threads = threads
        # Spinning idle threads win model-only timings but steal the cores that image readers and PNG
        # writers need (on 2 cores: folder encode 5.0k -> 5.8k images/s, decode to PNG 2.5k -> 2.9k
        # with spinning off), so pipelines turn it off and only model-only benchmarks keep it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
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

    def without_spinning(self) -> OnnxRuntimeRunner:
        """This graph on the CPU in a session whose idle threads sleep: for pipelines beside reader processes."""
        if self.provider != "CPUExecutionProvider" or not self.spin:
            return self
        return OnnxRuntimeRunner(self.path, "cpu", threads=self.threads, spin=False)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        result: np.ndarray = self.session.run(None, {self.input_name: batch})[0]
        return result

    def describe(self) -> str:
        fell_back = [p for p in self.requested if p != "CPUExecutionProvider" and p != self.provider]
        note = f" ({', '.join(fell_back)} listed but could not start)" if fell_back else ""
        if self.provider == TRT_PROVIDER and os.environ.get(TF32_OVERRIDE) != "0":
            note += f" (TF32 may be on: {TF32_OVERRIDE} is {os.environ.get(TF32_OVERRIDE)!r}, not '0')"
        return f"ONNX Runtime {self.version} on {self.provider}{note}"
