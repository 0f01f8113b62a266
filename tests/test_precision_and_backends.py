"""FP16 graphs with an FP32 quantizer, the runtime backends, and the parity command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import one_error_line, run_cli
from vqtool.errors import VqtoolError
from vqtool.formats.manifest import read_manifest
from vqtool.host import nvidia_gpu_present
from vqtool.runtime.select import open_runner


def _tensor_types(path: Path) -> dict[str, str]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    types = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in values}
    types.update({t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer})
    return types


def test_fp16_graph_runs_convolutions_in_fp16_and_the_quantizer_in_fp32(export_dir: Path) -> None:
    path = export_dir / "encoder.fp16.onnx"
    graph, types = onnx.load(str(path)), _tensor_types(path)
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[0]] == "FLOAT16" and types[n.input[1]] == "FLOAT16" for n in convs)
    (matmul,) = [n for n in graph.graph.node if n.op_type == "MatMul"]
    (argmin,) = [n for n in graph.graph.node if n.op_type == "ArgMin"]
    assert types[matmul.input[0]] == types[matmul.input[1]] == "FLOAT"
    assert types[argmin.input[0]] == "FLOAT"
    decoder = onnx.load(str(export_dir / "decoder.fp16.onnx"))
    (gather,) = [n for n in decoder.graph.node if n.op_type == "Gather"]
    assert _tensor_types(export_dir / "decoder.fp16.onnx")[gather.input[0]] == "FLOAT"


def test_fp16_parity_on_the_trained_model(export_dir: Path) -> None:
    reports = json.loads((export_dir / "parity.json").read_text())["reports"]
    (fp16,) = [r for r in reports if r["precision"] == "fp16" and r["runtime"] == "onnxruntime"]
    assert fp16["passed"] and fp16["unexplained"] == 0
    assert fp16["identical_fraction"] >= 0.995 and fp16["recon_psnr"] >= 40


def test_auto_backend_says_what_ran_and_why_others_did_not(export_dir: Path) -> None:
    manifest = read_manifest(export_dir)
    opened = open_runner(export_dir, manifest, "encoder")
    assert opened.runner.backend == "onnxruntime"
    described = opened.describe()
    assert opened.runner.provider in described
    if opened.runner.provider == "CPUExecutionProvider":
        assert "tensorrt on cuda" in described and "onnxruntime on cuda" in described


def test_every_backend_gives_the_same_codes(export_dir: Path, mixed_folder: Path, tmp_path: Path) -> None:
    results = {}
    for backend, precision in [("onnxruntime", "fp32"), ("torch", "fp32"), ("onnxruntime", "fp16")]:
        out = tmp_path / f"{backend}-{precision}.npy"
        result = run_cli(
            "encode",
            str(mixed_folder),
            "--model",
            str(export_dir),
            "--out",
            str(out),
            "--backend",
            backend,
            "--precision",
            precision,
            "--device",
            "cpu",
        )
        assert result.returncode == 0, result.stderr
        assert backend in result.stderr
        results[(backend, precision)] = np.load(out)
    assert np.array_equal(results[("onnxruntime", "fp32")], results[("torch", "fp32")])
    assert (results[("onnxruntime", "fp16")] == results[("onnxruntime", "fp32")]).mean() >= 0.9


def test_unavailable_backends_fail_clearly(export_dir: Path) -> None:
    manifest = read_manifest(export_dir)
    with pytest.raises(VqtoolError, match="runs on a CUDA GPU only"):
        open_runner(export_dir, manifest, "encoder", backend="tensorrt", device="cpu")
    with pytest.raises(VqtoolError, match="unknown backend"):
        open_runner(export_dir, manifest, "encoder", backend="tensorflow")
    # PyTorch runs FP16 on CUDA only (CPUs have BF16 arithmetic, not FP16 convolutions), and no INT8.
    with pytest.raises(VqtoolError, match="runs fp16 on CUDA only"):
        open_runner(export_dir, manifest, "encoder", backend="torch", precision="fp16")
    with pytest.raises(VqtoolError, match="int8 runs on ONNX Runtime or OpenVINO only"):
        open_runner(export_dir, manifest, "encoder", backend="torch", precision="int8")


def test_parity_command_compares_every_runtime_and_shows_the_naive_fp16(export_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(export_dir, copy)
    # ONNX Runtime's precisions only: what OpenVINO's BF16 gives depends on the CPU (tests/test_openvino.py).
    result = run_cli("parity", str(copy), "--naive-fp16", "--backend", "onnxruntime")
    assert result.returncode == 0, result.stderr
    report = json.loads((copy / "parity.json").read_text())
    assert {(r["runtime"], r["precision"]) for r in report["reports"]} >= {
        ("onnxruntime", "fp32"),
        ("onnxruntime", "fp16"),
    }
    assert report["naive_fp16_for_comparison"]["precision"] == "fp16-naive"
    assert "fp16-naive" in result.stdout and "not checked" in result.stderr
    if not nvidia_gpu_present():  # the CUDA runtimes it could not check, in one line rather than one per precision
        assert result.stderr.count("on cuda") == 1 and "onnxruntime on cuda: no NVIDIA GPU here" in result.stderr


def test_parity_command_on_user_images(export_dir: Path, mixed_folder: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(export_dir, copy)
    result = run_cli("parity", str(copy), "--images", str(mixed_folder), "--backend", "onnxruntime")
    reports = {r["precision"]: r for r in json.loads((copy / "parity.json").read_text())["reports"]}
    assert {r["images"] for r in reports.values()} == {8}
    # FP32 and FP16 must agree on any images; INT8 is judged by a rate (>= 90% identical), which 32 codes
    # measure too coarsely to hold on every CPU, so only its consistency with the exit status is checked.
    assert reports["fp32"]["passed"] and reports["fp16"]["passed"], result.stderr
    assert result.returncode == (0 if all(r["passed"] for r in reports.values()) else 1), result.stderr


def _trt_provider_starts() -> bool:
    import onnxruntime as ort

    return "TensorrtExecutionProvider" in ort.get_available_providers() and _gpu_present()


def _gpu_present() -> bool:
    from tests.conftest import _gpu_missing

    return _gpu_missing() is None


def test_onnxruntime_trt_gets_the_export_profile_and_says_why_it_cannot_start(
    export_dir: Path, mixed_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vqtool.runtime.onnxruntime import TrtOptions

    manifest = read_manifest(export_dir)
    assert TrtOptions.for_export(export_dir, manifest, "encoder", "fp32").profile_options() == {
        "trt_profile_min_shapes": "images:1x32x32x3",
        "trt_profile_opt_shapes": "images:64x32x32x3",
        "trt_profile_max_shapes": "images:256x32x32x3",
    }
    assert (
        TrtOptions.for_export(export_dir, manifest, "decoder", "fp16").profile_options()["trt_profile_max_shapes"]
        == "codes:256x2x2"
    )
    if _trt_provider_starts():
        pytest.skip("ONNX Runtime's TensorRT provider starts here")
    # ONNX Runtime prints the failed start on stdout, where results go; vqtool makes it the reason instead.
    result = run_cli(
        "encode",
        str(mixed_folder),
        "--model",
        str(export_dir),
        "--out",
        str(tmp_path / "c.npy"),
        "--backend",
        "onnxruntime-trt",
    )
    assert result.stdout == ""
    one_error_line(result, "TensorrtExecutionProvider is listed but could not start (")
    # TF32 is turned off for the whole process before the first GPU session, unless the user chose otherwise.
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    with pytest.raises(VqtoolError):
        open_runner(export_dir, manifest, "encoder", backend="onnxruntime-trt", device="cuda")
    assert os.environ["NVIDIA_TF32_OVERRIDE"] == "0"
