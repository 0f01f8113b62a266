"""The INT8 encoder: integer convolutions, an FP32 quantizer, its own parity tolerance, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from tests.conftest import run_cli
from vqtool.errors import VqtoolError
from vqtool.formats.manifest import read_manifest
from vqtool.runtime.select import open_runner


def test_int8_graph_quantizes_the_convolutions_and_keeps_the_quantizer_fp32(export_dir: Path) -> None:
    graph = onnx.load(str(export_dir / "encoder.int8.onnx")).graph
    made_by = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 4
    for conv in convs:
        activation, weight = made_by[conv.input[0]], made_by[conv.input[1]]
        assert activation.op_type == weight.op_type == "DequantizeLinear"
        assert initializers[weight.input[0]].data_type == onnx.TensorProto.INT8
        assert len(initializers[weight.input[1]].dims) == 1  # one scale per output channel
    (matmul,) = [n for n in graph.node if n.op_type == "MatMul"]
    (argmin,) = [n for n in graph.node if n.op_type == "ArgMin"]
    for tensor in (*matmul.input, *argmin.input):
        assert tensor not in made_by or made_by[tensor].op_type != "DequantizeLinear"
    assert {p.key: p.value for p in onnx.load(str(export_dir / "encoder.int8.onnx")).metadata_props}[
        "vqtool.precision"
    ] == "int8"


def test_int8_folds_each_relu_into_the_convolution_before_it(export_dir: Path) -> None:
    """A convolution followed by a ReLU has its output quantized over the ReLU's range: zero point 0, so all 256
    levels hold values the ReLU keeps (calibrated before the ReLU, about 200 of them held negatives), and the
    integer convolution's clamp at the zero point is the ReLU, which leaves the graph."""
    fp32 = onnx.load(str(export_dir / "encoder.onnx")).graph
    int8 = onnx.load(str(export_dir / "encoder.int8.onnx")).graph
    feeds_relu = [
        index
        for index, conv in enumerate(n for n in fp32.node if n.op_type == "Conv")
        if any(n.op_type == "Relu" and conv.output[0] in n.input for n in fp32.node)
    ]
    assert feeds_relu == [0, 1, 2]  # the seed's encoder: three ReLUs, none after the last convolution
    assert not [n for n in int8.node if n.op_type == "Relu"]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in int8.initializer}
    convs = [n for n in int8.node if n.op_type == "Conv"]
    for index in feeds_relu:
        (quantize,) = [n for n in int8.node if n.op_type == "QuantizeLinear" and n.input[0] == convs[index].output[0]]
        assert initializers[quantize.input[2]] == 0


def test_int8_parity_is_judged_end_to_end(export_dir: Path) -> None:
    reports = json.loads((export_dir / "parity.json").read_text())["reports"]
    (int8,) = [r for r in reports if r["precision"] == "int8" and r["runtime"] == "onnxruntime"]
    assert int8["passed"] and int8["runtime"] == "onnxruntime" and int8["decoded"] == "own"
    assert 0.9 <= int8["identical_fraction"] < 1.0  # INT8 really differs, within its tolerance
    assert int8["quality_drop_db"] <= 0.5
    (fp32,) = [r for r in reports if r["precision"] == "fp32" and r["runtime"] == "onnxruntime"]
    assert fp32["decoded"] == "pytorch" and fp32["identical_fraction"] == 1.0


def test_int8_encode_of_image_files_agrees_with_what_parity_measured(
    export_dir: Path, trained_checkpoint: Path, tmp_path: Path
) -> None:
    """The held-out images as PNG files, encoded by the CLI in FP32 and INT8, agree exactly as often as parity
    measured on the same images in memory: the INT8 path through files is the one parity vouched for."""
    from vqtool.model.checkpoint import load_checkpoint
    from vqtool.train.data.run_data import held_out_images

    images = held_out_images(load_checkpoint(trained_checkpoint), log=lambda _: None)
    folder = tmp_path / "held-out"
    folder.mkdir()
    for index, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    codes = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.npy"
        args = ["encode", str(folder), "--model", str(export_dir), "--out", str(out), "--precision", precision]
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert f"in {precision} with onnxruntime" in result.stderr  # says what really ran
        assert json.loads(out.with_suffix(".json").read_text())["precision"] == precision
        codes[precision] = np.load(out)
    assert codes["int8"].shape == codes["fp32"].shape == (len(images), 2, 2)
    reports = json.loads((export_dir / "parity.json").read_text())["reports"]
    (int8,) = [r for r in reports if r["precision"] == "int8" and r["runtime"] == "onnxruntime"]
    assert (codes["int8"] == codes["fp32"]).mean() == pytest.approx(int8["identical_fraction"], abs=1e-12)


def test_int8_refuses_what_it_cannot_do(export_dir: Path, tmp_path: Path) -> None:
    manifest = read_manifest(export_dir)
    with pytest.raises(VqtoolError, match="for encoding only"):
        open_runner(export_dir, manifest, "decoder", precision="int8")
    with pytest.raises(VqtoolError, match="runs on the CPU only"):
        open_runner(export_dir, manifest, "encoder", backend="tensorrt", precision="int8")
    with pytest.raises(VqtoolError, match="runs on the CPU only"):
        open_runner(export_dir, manifest, "encoder", device="cuda", precision="int8")
    opened = open_runner(export_dir, manifest, "encoder", device="auto", precision="int8")
    assert opened.runner.provider == "CPUExecutionProvider"
    without = json.loads((export_dir / "manifest.json").read_text())
    del without["graphs"]["encoder.int8"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "manifest.json").write_text(json.dumps(without))
    with pytest.raises(VqtoolError, match="export again with --int8"):
        open_runner(plain, read_manifest(plain), "encoder", precision="int8")


def test_calibration_on_the_users_images(trained_checkpoint: Path, mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = run_cli(
        "export",
        str(trained_checkpoint),
        "--out",
        str(out),
        "--int8",
        "--calibration",
        str(mixed_folder),
        "--calibration-images",
        "64",
    )
    assert result.returncode == 0, result.stderr
    assert f"calibrating INT8 ranges on 64 images from {mixed_folder}" in result.stderr
    assert "Collecting tensor data" not in result.stdout  # the quantizer's narration stays off stdout
    assert "encoder.int8.onnx" in read_manifest(out).graphs["encoder.int8"].file


def test_int8_calibrated_on_flat_grey_fails_parity(trained_checkpoint: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "flat.npy", np.full((64, 32, 32, 3), 128, dtype=np.uint8))
    out = tmp_path / "export"
    result = run_cli(
        "export", str(trained_checkpoint), "--out", str(out), "--int8", "--calibration", str(tmp_path / "flat.npy")
    )
    assert result.returncode == 1
    assert "parity failed (onnxruntime int8:" in result.stderr and "identical codes, below 90.0%" in result.stderr
    assert not out.exists() and (tmp_path / "export.failed-parity" / "encoder.int8.onnx").is_file()
