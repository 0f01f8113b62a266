"""Choosing a runtime for an export: ONNX Runtime (CPU, CUDA, TensorRT EP), native TensorRT, OpenVINO, or PyTorch.

`auto` tries the GPU runtimes first and keeps the first that actually starts, remembering why the
others did not, so every command can say what really ran. On the CPU it chooses by measurement: the
fastest runtime in the export's bench.json among those whose codes parity.json shows exact (FP32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.errors import VqtoolError, missing_extra
from vqtool.manifest import Manifest, sha256_file, verify_graph
from vqtool.runtime import DEVICES, OnnxRuntimeRunner, Runner, TrtProfile

BACKENDS = ("auto", "onnxruntime", "onnxruntime-trt", "tensorrt", "openvino", "torch")
INT8 = "int8"
BF16 = "bf16"  # OpenVINO's BF16 inference over the FP32 graph; no file of its own
PRECISIONS = ("fp32", "fp16", BF16, INT8)
CPU_RUNTIMES = ("onnxruntime", "openvino")
# Graph names also exist for the all-FP16 graph that parity builds for comparison; it never runs here.
NAIVE_FP16 = "fp16-naive"
ROLES = ("encoder", "decoder")
PYTORCH_FILE = "model.pt"


def graph_key(role: str, precision: str) -> str:
    """Manifest key and file stem: encoder, decoder, encoder.fp16, decoder.fp16, encoder.int8 (and *.fp16-naive)."""
    if role not in ROLES or precision not in (*PRECISIONS, NAIVE_FP16):
        raise VqtoolError(f"unknown graph {role}/{precision}")
    return role if precision in ("fp32", BF16) else f"{role}.{precision}"


def offers(backend: str, precision: str) -> bool:
    """Whether a backend runs a precision at all: BF16 is OpenVINO's alone, which runs no FP16; torch runs FP32."""
    if backend == "torch":
        return precision == "fp32"
    if precision == BF16:
        return backend == "openvino"
    return not (backend == "openvino" and precision == "fp16")


def check_int8(role: str, backend: str, device: str) -> None:
    """INT8 is an encoder for CPUs (8-bit dot products); say so before trying anything."""
    if role != "encoder":
        raise VqtoolError("--precision int8 is for encoding only; decode with fp32 or fp16")
    if backend not in ("auto", *CPU_RUNTIMES) or device == "cuda":
        raise VqtoolError("--precision int8 runs on the CPU only; use --backend onnxruntime or openvino")


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
    """A started runner and, for auto, why it was chosen and why faster backends were passed over."""

    runner: Runner
    skipped: tuple[str, ...]
    chosen: str = ""

    def describe(self) -> str:
        note = f" ({self.chosen})" if self.chosen else ""
        note += f" (passed over: {'; '.join(self.skipped)})" if self.skipped else ""
        return f"{self.runner.backend}: {self.runner.describe()}{note}"


def read_record(path: Path) -> dict[str, Any]:
    """A JSON object the export keeps (parity.json, bench.json), or {} where it is missing or unreadable."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def recorded_parity(export_dir: Path, backend: str, precision: str) -> dict[str, Any] | None:
    """This runtime's report in the export's parity.json (written by export and by `vqtool parity`), if any."""
    for report in read_record(export_dir / "parity.json").get("reports", []):
        if isinstance(report, dict) and report.get("runtime") == backend and report.get("precision") == precision:
            return report
    return None


def check_bf16(export_dir: Path) -> str:
    """Refuse BF16 where parity.json records that it missed its rule; say so where it was never checked."""
    report = recorded_parity(export_dir, "openvino", BF16)
    if report is None:
        return "bf16 not yet checked on this export: vqtool parity EXPORT_DIR --precision bf16"
    if not report.get("passed"):
        failures = report.get("failures") or ["failed"]
        raise VqtoolError(
            f"bf16 failed parity on this export here ({failures[0]}); use fp32 or int8", export_dir / "parity.json"
        )
    return f"bf16 passed parity: {report.get('identical_fraction', 0):.2%} identical codes"


def cpu_choice(export_dir: Path, role: str, precision: str) -> tuple[list[str], str]:
    """The CPU runtimes auto tries, best first, and the reason, from what this export has measured.

    Exact first: a runtime is a candidate at fp32 only if parity.json shows every one of its codes identical to
    PyTorch's (ONNX Runtime always is: export checks it), and at int8 only if it passed the INT8 rule. Among
    those, bench.json (written by `vqtool bench` on this machine) decides by speed at its largest batch.
    BF16 runs on OpenVINO only.
    """
    if precision == BF16:
        return ["openvino"], "bf16 runs on OpenVINO only"
    stage = "encode" if role == "encoder" else "decode"
    exact = {"onnxruntime"}
    report = recorded_parity(export_dir, "openvino", precision)
    if report and report.get("passed") and (precision != "fp32" or report.get("identical") == report.get("codes")):
        exact.add("openvino")
    rows = [
        r
        for r in read_record(export_dir / "bench.json").get("model_only", [])
        if isinstance(r, dict) and r.get("stage") == stage and r.get("precision") == precision
    ]
    largest = max((int(r.get("batch", 0)) for r in rows), default=0)
    speeds = {r.get("backend"): float(r.get("images_per_s", 0)) for r in rows if r.get("batch") == largest}
    measured = [name for name in CPU_RUNTIMES if name in speeds]
    if "openvino" not in exact or len(measured) < 2:
        why = "parity.json shows no exact OpenVINO codes" if "openvino" not in exact else "bench.json measures no race"
        return ["onnxruntime", "openvino"], f"on the CPU: ONNX Runtime by default, {why}"
    order = sorted(CPU_RUNTIMES, key=lambda name: -speeds[name])
    figures = " against ".join(f"{name} {speeds[name]:,.0f}" for name in order)
    exactness = "identical codes" if precision == "fp32" else "passed parity"
    return order, f"fastest on the CPU with {exactness}: {figures} images/s at batch {largest} in bench.json"


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
    if precision == BF16 and backend != "openvino":
        raise VqtoolError("--precision bf16 runs on OpenVINO only; use --backend openvino")
    if backend == "openvino":
        from vqtool.openvino_runtime import OpenVinoRunner

        if device == "cuda":
            raise VqtoolError("--backend openvino runs on the CPU here; use --device cpu or auto")
        if precision == "fp16":
            raise VqtoolError("--backend openvino runs fp32, bf16 or int8 on the CPU; use one of those")
        graph = verify_graph(export_dir, manifest, graph_key(role, precision))
        return OpenVinoRunner(graph, role, precision, threads=threads)
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
    cpu_order, why = cpu_choice(export_dir, role, precision)
    gpu = [] if precision == BF16 else [("tensorrt", "cuda"), ("onnxruntime", "cuda")]
    for name, where in [*gpu, *((name, "cpu") for name in cpu_order)]:
        if device != "auto" and where != device:
            continue
        try:
            runner = _open(export_dir, manifest, role, name, where, precision, spin, threads)
        except VqtoolError as exc:
            skipped.append(f"{name} on {where}: {str(exc).split('; ')[0]}")
            continue
        return Opened(runner, tuple(skipped), why if where == "cpu" else "")
    raise VqtoolError(f"no backend could start: {'; '.join(skipped)}")
