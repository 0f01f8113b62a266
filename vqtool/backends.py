"""Choosing a runtime for an export: ONNX Runtime (CPU, CUDA, TensorRT EP), native TensorRT, or PyTorch.

`auto` tries the fastest first and keeps the first that actually starts, remembering why the
others did not, so every command can say what really ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.errors import VqtoolError, missing_extra
from vqtool.manifest import Manifest, sha256_file, verify_graph
from vqtool.runtime import DEVICES, OnnxRuntimeRunner, Runner, TrtProfile

BACKENDS = ("auto", "onnxruntime", "onnxruntime-trt", "tensorrt", "torch")
INT8 = "int8"
PRECISIONS = ("fp32", "fp16", INT8)
# Graph names also exist for the all-FP16 graph that parity builds for comparison; it never runs here.
NAIVE_FP16 = "fp16-naive"
ROLES = ("encoder", "decoder")
PYTORCH_FILE = "model.pt"


def graph_key(role: str, precision: str) -> str:
    """Manifest key and file stem: encoder, decoder, encoder.fp16, decoder.fp16, encoder.int8 (and *.fp16-naive)."""
    if role not in ROLES or precision not in (*PRECISIONS, NAIVE_FP16):
        raise VqtoolError(f"unknown graph {role}/{precision}")
    return role if precision == "fp32" else f"{role}.{precision}"


def check_int8(role: str, backend: str, device: str) -> None:
    """INT8 is an encoder for ONNX Runtime's CPU provider (8-bit dot products); say so before trying anything."""
    if role != "encoder":
        raise VqtoolError("--precision int8 is for encoding only; decode with fp32 or fp16")
    if backend not in ("auto", "onnxruntime") or device == "cuda":
        raise VqtoolError("--precision int8 runs on ONNX Runtime's CPU provider only; use --backend onnxruntime")


def engine_path(export_dir: Path, role: str, precision: str) -> Path:
    return export_dir / f"{graph_key(role, precision)}.engine"


class TorchRunner:
    """The exported PyTorch model itself (export_dir/model.pt), for comparison and as a fallback."""

    backend = "torch"

    def __init__(self, export_dir: Path, manifest: Manifest, role: str, device: str) -> None:
        try:
            import torch
        except ModuleNotFoundError:
            raise missing_extra("--backend torch", "PyTorch", "train") from None
        from vqtool.train.checkpoint import CheckpointError, load_checkpoint

        path = export_dir / PYTORCH_FILE
        if manifest.pytorch_sha256 and path.is_file() and sha256_file(path) != manifest.pytorch_sha256:
            raise VqtoolError("does not match the checksum in manifest.json; re-export", path)
        if device == "cuda" and not torch.cuda.is_available():
            raise VqtoolError("--backend torch --device cuda: PyTorch sees no CUDA GPU here")
        self.device = torch.device(
            "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        )
        if self.device.type == "cuda":
            # TF32 would round FP32 convolutions and matmuls to 10 mantissa bits: codes would stop being FP32's.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        try:
            self.model = load_checkpoint(path).model.to(self.device).eval()
        except CheckpointError as exc:
            raise VqtoolError(str(exc)) from None
        self.role = role
        self.provider = f"PyTorch {torch.__version__} on {self.device.type}"
        self.torch = torch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        from vqtool.train.model import images_to_input, output_to_images

        torch = self.torch
        with torch.inference_mode():
            data = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            if self.role == "encoder":
                result = self.model.encode(images_to_input(data)).to(torch.int32)
            else:
                result = output_to_images(self.model.decode(data.long()))
            array: np.ndarray = result.cpu().numpy()
            return array

    def describe(self) -> str:
        return self.provider


@dataclass(frozen=True)
class Opened:
    """A started runner and, for auto, why faster backends were passed over."""

    runner: Runner
    skipped: tuple[str, ...]

    def describe(self) -> str:
        note = f" (passed over: {'; '.join(self.skipped)})" if self.skipped else ""
        return f"{self.runner.backend}: {self.runner.describe()}{note}"


def trt_profile(export_dir: Path, manifest: Manifest, role: str, precision: str) -> TrtProfile:
    """The batch range of the export's own TensorRT engine if it has one, else the default one, at the model's size."""
    from vqtool.trt_runtime import DEFAULT_BATCH_PROFILE, read_engine_metadata

    entry = manifest.graphs[graph_key(role, precision)]
    tail = (manifest.image_size, manifest.image_size, 3) if role == "encoder" else (manifest.grid, manifest.grid)
    batches = DEFAULT_BATCH_PROFILE
    engine = engine_path(export_dir, role, precision)
    if engine.is_file():
        meta = read_engine_metadata(engine)
        batches = (meta.profile_min[0], meta.profile_opt[0], meta.profile_max[0])
    return TrtProfile(entry.input, tail, batches)


def _open(
    export_dir: Path,
    manifest: Manifest,
    role: str,
    backend: str,
    device: str,
    precision: str,
    spin: bool,
    threads: int | None,
) -> Runner:
    if backend == "torch":
        if precision != "fp32":
            raise VqtoolError("--backend torch runs the FP32 PyTorch model only; use --precision fp32")
        return TorchRunner(export_dir, manifest, role, device)
    if backend == "tensorrt":
        from vqtool.trt_runtime import TensorRTRunner, import_tensorrt

        if device == "cpu":
            raise VqtoolError("--backend tensorrt runs on a CUDA GPU only; use --device cuda or auto")
        path = engine_path(export_dir, role, precision)
        if not path.is_file():
            import_tensorrt()  # a missing TensorRT is the more useful message
            raise VqtoolError(
                f"no {precision} TensorRT engine here; build one with vqtool export CHECKPOINT --trt", path
            )
        return TensorRTRunner(path)
    if graph_key(role, precision) not in manifest.graphs and precision != "fp32":
        raise VqtoolError(f"export has no {precision} {role} graph (export again with --{precision})", export_dir)
    graph = verify_graph(export_dir, manifest, graph_key(role, precision))
    if backend == "onnxruntime-trt":
        if device == "cpu":
            raise VqtoolError("--backend onnxruntime-trt needs a CUDA GPU; use --device cuda or auto")
        profile = trt_profile(export_dir, manifest, role, precision)
        return OnnxRuntimeRunner(
            graph, "tensorrt", trt_cache=export_dir / "ort_trt_cache", trt_profile=profile, spin=spin
        )
    return OnnxRuntimeRunner(graph, device, threads=threads, spin=spin)


def open_runner(
    export_dir: Path,
    manifest: Manifest,
    role: str,
    *,
    backend: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    spin: bool = False,
    threads: int | None = None,
) -> Opened:
    """Start the requested backend, or with auto the fastest one that starts here.

    `spin` keeps ONNX Runtime's idle threads spinning: faster alone, slower beside readers/writers.
    `threads` caps ONNX Runtime's intra-op threads on the CPU (default: one per core).
    """
    if backend not in BACKENDS:
        raise VqtoolError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise VqtoolError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise VqtoolError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if precision == INT8:
        check_int8(role, backend, device)
        device = "cpu"
    if backend != "auto":
        return Opened(_open(export_dir, manifest, role, backend, device, precision, spin, threads), ())
    skipped: list[str] = []
    candidates = [("tensorrt", "cuda"), ("onnxruntime", "cuda"), ("onnxruntime", "cpu")]
    for name, where in candidates:
        if device != "auto" and where != device:
            continue
        try:
            return Opened(_open(export_dir, manifest, role, name, where, precision, spin, threads), tuple(skipped))
        except VqtoolError as exc:
            skipped.append(f"{name} on {where}: {str(exc).split('; ')[0]}")
    raise VqtoolError(f"no backend could start: {'; '.join(skipped)}")
