"""The graphs work in other people's tools: TensorRT's parser (statically) and NVIDIA Polygraphy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vqtool.export.tensorrt_ops import trt_problems
from vqtool.model.checkpoint import load_checkpoint
from vqtool.model.vqvae import images_to_input
from vqtool.train.data.run_data import held_out_images


@pytest.mark.parametrize("graph", ["encoder.onnx", "decoder.onnx", "encoder.fp16.onnx", "decoder.fp16.onnx"])
def test_graphs_stay_inside_tensorrts_operator_matrix(export_dir: Path, graph: str) -> None:
    assert trt_problems(onnx.load(str(export_dir / graph))) == []


def test_the_static_check_catches_what_tensorrt_rejects(export_dir: Path) -> None:
    model = onnx.load(str(export_dir / "encoder.onnx"))
    model.opset_import[0].version = 21
    first = model.graph.node[0]
    model.graph.node.insert(1, onnx.helper.make_node("Hardmax", [first.output[0]], ["unsupported"]))
    problems = trt_problems(model)
    assert any("opset 21" in p for p in problems) and any("Hardmax" in p for p in problems)


def test_uint8_inside_the_network_is_reported() -> None:
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]), helper.make_node("Cast", ["t"], ["y"], to=1)],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 4, 4, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert any("UINT8 tensor t inside the network" in p for p in trt_problems(model))


def _polygraphy(*args: str) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).with_name("polygraphy")
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=300)


def test_polygraphy_runs_the_encoder_and_matches_saved_pytorch_codes(
    export_dir: Path, trained_checkpoint: Path, tmp_path: Path
) -> None:
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    checkpoint = load_checkpoint(trained_checkpoint)
    images = held_out_images(checkpoint, log=lambda _: None)[:64]
    with torch.no_grad():
        codes = checkpoint.model.encode(images_to_input(torch.from_numpy(images))).to(torch.int32).numpy()
    save_json([{"images": images}], str(tmp_path / "inputs.json"))

    def golden(values: np.ndarray, name: str) -> Path:
        path = tmp_path / f"{name}.json"
        RunResults([("pytorch", [IterationResult({"codes": values}, runner_name="pytorch")])]).save(str(path))
        return path

    common = [
        str(export_dir / "encoder.onnx"),
        "--onnxrt",
        "--load-inputs",
        str(tmp_path / "inputs.json"),
        "--atol",
        "0",
        "--rtol",
        "0",
        "--check-error-stat",
        "max",
    ]
    matched = _polygraphy("run", *common, "--load-outputs", str(golden(codes, "pytorch")))
    assert matched.returncode == 0, matched.stdout + matched.stderr
    assert "PASSED" in matched.stdout + matched.stderr
    # The comparison is real: one wrong code makes Polygraphy fail.
    wrong = codes.copy()
    wrong[0, 0, 0] = (wrong[0, 0, 0] + 1) % checkpoint.model_config.codes
    mismatched = _polygraphy("run", *common, "--load-outputs", str(golden(wrong, "wrong")))
    assert mismatched.returncode != 0
