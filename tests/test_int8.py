"""The INT8 encoder: integer convolutions, an FP32 quantizer, the bounded contract, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import vqtool
from tests.conftest import run_cli
from vqtool.errors import VqtoolError
from vqtool.formats.manifest import read_manifest
from vqtool.runtime.select import open_runner


def _fp32_prefix(graph_path: Path) -> int:
    """How many of the first convolutions the INT8 search kept FP32."""
    from vqtool.export.quantize import FP32_CONVOLUTIONS_KEY

    return int({p.key: p.value for p in onnx.load(str(graph_path)).metadata_props}[FP32_CONVOLUTIONS_KEY])


def test_int8_graph_quantizes_the_convolutions_and_keeps_the_quantizer_fp32(int8_export: Path) -> None:
    graph = onnx.load(str(int8_export / "encoder.int8.onnx")).graph
    made_by = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    fp32 = onnx.load(str(int8_export / "encoder.onnx")).graph
    assert len(convs) == len([n for n in fp32.node if n.op_type == "Conv"])
    kept = _fp32_prefix(int8_export / "encoder.int8.onnx")
    assert kept <= len(convs) // 2
    for conv in convs[kept:]:
        activation, weight = made_by[conv.input[0]], made_by[conv.input[1]]
        assert activation.op_type == weight.op_type == "DequantizeLinear"
        assert initializers[weight.input[0]].data_type == onnx.TensorProto.INT8
        assert len(initializers[weight.input[1]].dims) == 1  # one scale per output channel
        # Weights in 7 bits: a CPU without VNNI sums pairs of uint8 x int8 products in int16, which 8-bit weights
        # overflow (2 x 255 x 128); each channel's largest weight uses the 7-bit range, not the 8-bit one.
        weights = np.abs(onnx.numpy_helper.to_array(initializers[weight.input[0]]).astype(np.int32))
        assert weights.max() <= 64 and weights.reshape(len(weights), -1).max(axis=1).min() >= 60
    # The quantizer (the projection to the lookup dimensions, the distances, the ArgMin) stays FP32.
    searching = [n for n in graph.node if n.op_type in ("MatMul", "ArgMin")]
    assert {n.op_type for n in searching} == {"MatMul", "ArgMin"}
    for tensor in (t for node in searching for t in node.input):
        assert tensor not in made_by or made_by[tensor].op_type != "DequantizeLinear"
    assert {p.key: p.value for p in onnx.load(str(int8_export / "encoder.int8.onnx")).metadata_props}[
        "vqtool.precision"
    ] == "int8"


def test_int8_folds_each_relu_into_the_convolution_before_it(int8_export: Path) -> None:
    """A quantized convolution followed by a ReLU has its output quantized over the ReLU's range: zero point 0, so
    all 256 levels hold values the ReLU keeps, and the integer convolution's clamp at the zero point is the ReLU,
    which leaves the graph."""
    fp32 = onnx.load(str(int8_export / "encoder.onnx")).graph
    int8 = onnx.load(str(int8_export / "encoder.int8.onnx")).graph
    kept = _fp32_prefix(int8_export / "encoder.int8.onnx")
    feeds_relu = [
        index
        for index, conv in enumerate(n for n in fp32.node if n.op_type == "Conv")
        if index >= kept and any(n.op_type == "Relu" and conv.output[0] in n.input for n in fp32.node)
    ]
    assert feeds_relu  # the fault this guards against exists in this encoder
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in int8.initializer}
    convs = [n for n in int8.node if n.op_type == "Conv"]
    for index in feeds_relu:
        assert not any(n.op_type == "Relu" and convs[index].output[0] in n.input for n in int8.node)
        (quantize,) = [n for n in int8.node if n.op_type == "QuantizeLinear" and n.input[0] == convs[index].output[0]]
        assert initializers[quantize.input[2]] == 0


def test_int8_is_published_under_the_bounded_contract_judged_end_to_end(int8_export: Path) -> None:
    from vqtool.precisions import BOUNDED

    reports = json.loads((int8_export / "parity.json").read_text())["reports"]
    (int8,) = [r for r in reports if r["precision"] == "int8" and r["runtime"] == "onnxruntime"]
    assert int8["passed"] and int8["contract"] == "bounded" and int8["decoded"] == "own"
    assert 0.5 <= int8["identical_fraction"] < 1.0  # INT8 really differs, within the bounded contract
    assert int8["regret_p99"] <= BOUNDED.max_regret_p99 and int8["rank_max"] <= BOUNDED.max_rank
    assert int8["drift_psnr"] is None or int8["drift_psnr"] >= BOUNDED.min_drift_psnr
    assert "int8 has no exact contract" in int8["outside_exact"]
    (fp32,) = [r for r in reports if r["precision"] == "fp32" and r["runtime"] == "onnxruntime"]
    # FP32 meets the exact contract: identical but for near-ties, which the CPU's and PyTorch's thread count decide.
    assert fp32["decoded"] == "pytorch" and fp32["unexplained"] == 0 and fp32["contract"] == "exact"


def test_int8_encode_of_image_files_agrees_with_what_parity_measured(int8_export: Path, tmp_path: Path) -> None:
    """The held-out images as PNG files, encoded by the CLI in FP32 and INT8, agree exactly as often as parity
    measured on the same images in memory: the INT8 path through files is the one parity vouched for, and the
    codes say which contract made them."""
    from vqtool.model.checkpoint import load_checkpoint
    from vqtool.train.data.run_data import held_out_images

    images = held_out_images(load_checkpoint(int8_export / "model.pt"), log=lambda _: None)
    folder = tmp_path / "held-out"
    folder.mkdir()
    for index, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    codes = {}
    for precision, contract in (("fp32", "exact"), ("int8", "bounded")):
        out = tmp_path / f"{precision}.npy"
        args = ["encode", str(folder), "--model", str(int8_export), "--out", str(out), "--precision", precision]
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert f"in {precision} with onnxruntime" in result.stderr  # says what really ran
        assert f"under the {contract} contract" in result.stdout
        sidecar = json.loads(out.with_suffix(".json").read_text())
        assert sidecar["precision"] == precision and sidecar["contract"]["name"] == contract
        codes[precision] = np.load(out)
    assert codes["int8"].shape == codes["fp32"].shape == (len(images), 8, 8)
    reports = json.loads((int8_export / "parity.json").read_text())["reports"]
    (int8,) = [r for r in reports if r["precision"] == "int8" and r["runtime"] == "onnxruntime"]
    assert (codes["int8"] == codes["fp32"]).mean() == pytest.approx(int8["identical_fraction"], abs=1e-12)
    assert sidecar["contract"]["identical_fraction"] == int8["identical_fraction"]


def test_int8_refuses_what_it_cannot_do(int8_export: Path, tmp_path: Path) -> None:
    export_dir = int8_export
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


@pytest.mark.slow  # calibration from a folder through the command: tests/test_import_int8.py
def test_calibration_on_the_users_images(int8_export: Path, mixed_folder: Path, tmp_path: Path) -> None:
    """The folder holds every awkward mode (grey, RGBA, palette, 16-bit), each read as encode reads it."""
    out = tmp_path / "export"
    checkpoint = int8_export.parent / "run" / "checkpoint.pt"
    result = run_cli(
        "export", str(checkpoint), "--out", str(out), "--int8", "--calibration", str(mixed_folder),
        "--calibration-images", "64",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"calibrating INT8 ranges on 64 images from {mixed_folder}" in result.stderr
    assert "Collecting tensor data" not in result.stdout  # the quantizer's narration stays off stdout
    assert "encoder.int8.onnx" in read_manifest(out).graphs["encoder.int8"].file


def test_int8_calibrated_on_flat_grey_meets_no_contract(int8_export: Path, tmp_path: Path) -> None:
    """The same model calibrated on its own data is published (int8_export); on flat grey, its INT8 ranges are
    useless and export refuses that graph with the figures, and publishes the FP32 ones, which no runtime confuses
    with it."""
    np.save(tmp_path / "flat.npy", np.full((64, 32, 32, 3), 128, dtype=np.uint8))
    out = tmp_path / "export"
    checkpoint = int8_export.parent / "run" / "checkpoint.pt"
    result = run_cli(
        "export", str(checkpoint), "--out", str(out), "--int8", "--calibration", str(tmp_path / "flat.npy")
    )
    assert result.returncode == 0, result.stderr
    assert "onnxruntime int8: refused, it meets no contract (int8 has no exact contract" in result.stderr
    assert "bounded: " in result.stderr and result.stdout.rstrip().endswith("refused: onnxruntime int8")
    reports = {r["precision"]: r for r in json.loads((out / "parity.json").read_text())["reports"]}
    assert reports["int8"]["contract"] == "none" and reports["fp32"]["contract"] == "exact"
    assert not (tmp_path / "export.failed-parity").exists()
    with pytest.raises(VqtoolError, match="int8 met no contract on this export"):
        open_runner(out, read_manifest(out), "encoder", precision="int8")
    with vqtool.load(out) as tokenizer:
        assert tokenizer.contract.name == "exact"
