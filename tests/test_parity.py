"""Parity of the exported ONNX graphs with PyTorch, on a model trained in this session."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vqtool.export.graphs import write_graphs
from vqtool.export.parity import Reference, check_parity, classify_mismatches, torch_reference
from vqtool.export.pipeline import ParityFailed, export_model
from vqtool.formats.manifest import read_manifest, sha256_file
from vqtool.model.checkpoint import load_checkpoint
from vqtool.runtime.onnxruntime import OnnxRuntimeRunner
from vqtool.train.data.run_data import held_out_images


def test_fp32_parity_report_passes(export_dir: Path) -> None:
    report = json.loads((export_dir / "parity.json").read_text())["reports"][0]
    assert report["precision"] == "fp32" and report["provider"] == "CPUExecutionProvider"
    assert report["passed"] and report["unexplained"] == 0
    assert report["identical"] + report["near_ties"] == report["codes"] == report["images"] * 4
    assert report["recon_max_abs"] <= 1


def test_onnx_runtime_codes_equal_pytorch_codes(export_dir: Path, trained_checkpoint: Path) -> None:
    """Independent of parity.py: run the sessions directly and compare with model.encode."""
    checkpoint = load_checkpoint(trained_checkpoint)
    images = held_out_images(checkpoint, log=lambda _: None)
    encoder = OnnxRuntimeRunner(export_dir / "encoder.onnx", "cpu")
    decoder = OnnxRuntimeRunner(export_dir / "decoder.onnx", "cpu")
    ours = encoder(images)
    with torch.no_grad():
        from vqtool.model.vqvae import images_to_input, output_to_images

        theirs = checkpoint.model.encode(images_to_input(torch.from_numpy(images))).numpy()
        recon = output_to_images(checkpoint.model.decode(torch.from_numpy(theirs))).numpy()
    # Any differing code must be a near-tie of PyTorch's own distances (none is usual; a tie may fall either way).
    reference = torch_reference(checkpoint.model, images)
    codebook = checkpoint.model.quantizer.search_codebook().detach()
    assert classify_mismatches(reference, codebook, ours, rtol=1e-5)[1] == 0
    assert np.abs(decoder(theirs.astype(np.int32)).astype(int) - recon.astype(int)).max() <= 1
    # Precondition: the trained model uses several codes, so the comparison is not trivial.
    assert len(np.unique(theirs)) >= 3


def test_graphs_hold_the_quantizer_and_the_lookup(export_dir: Path) -> None:
    manifest = read_manifest(export_dir)
    encoder, decoder = onnx.load(str(export_dir / "encoder.onnx")), onnx.load(str(export_dir / "decoder.onnx"))
    for graph in (encoder, decoder):
        onnx.checker.check_model(graph, full_check=True)
        assert graph.opset_import[0].version == manifest.opset <= 20
    assert {"ArgMin", "MatMul", "Conv"} <= {n.op_type for n in encoder.graph.node}
    assert {"Gather", "ConvTranspose", "Round"} <= {n.op_type for n in decoder.graph.node}
    enc_in = encoder.graph.input[0].type.tensor_type
    assert enc_in.elem_type == onnx.TensorProto.UINT8 and enc_in.shape.dim[0].dim_param  # dynamic batch
    assert encoder.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert decoder.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    for name, entry in manifest.graphs.items():
        assert sha256_file(export_dir / entry.file) == entry.sha256, name
    props = {p.key: p.value for p in encoder.metadata_props}
    assert json.loads(props["vqtool.model_config"])["codes"] == manifest.codes


def test_dynamic_batch_and_larger_images(export_dir: Path) -> None:
    encoder = OnnxRuntimeRunner(export_dir / "encoder.onnx", "cpu")
    images = np.random.default_rng(0).integers(0, 256, (7, 64, 48, 3), dtype=np.uint8)
    codes = encoder(images)
    assert codes.shape == (7, 4, 3)
    assert np.array_equal(encoder(images[:1]), codes[:1])


def test_parity_catches_a_wrong_codebook(export_dir: Path, trained_checkpoint: Path, tmp_path: Path) -> None:
    """An encoder graph whose codes a and b are swapped must fail parity: the check can fail.

    The swap is made in the model, before export, so it swaps two codes whatever layout the graph
    stores the codebook in (a transposed D x K initializer, say).
    """
    checkpoint = load_checkpoint(trained_checkpoint)
    images = held_out_images(checkpoint, log=lambda _: None)
    reference = torch_reference(checkpoint.model, images)
    used, counts = np.unique(reference.codes, return_counts=True)
    a, b = (int(code) for code in used[np.argsort(counts)[-2:]])
    damaged = copy.deepcopy(checkpoint.model)
    with torch.no_grad():
        weights = damaged.quantizer.codebook.weight
        weights[[a, b]] = weights[[b, a]].clone()
    entries = write_graphs(damaged, "damaged", tmp_path, "fp32")
    bad = OnnxRuntimeRunner(tmp_path / entries["encoder"].file, "cpu")
    # The fault bites: the damaged graph gives other codes for these images (every a becomes b).
    assert (bad(images) != reference.codes).any()
    decoder = OnnxRuntimeRunner(export_dir / "decoder.onnx", "cpu")
    report = check_parity(
        checkpoint.model,
        images,
        bad,
        decoder,
        runtime="onnxruntime",
        provider=bad.provider,
        precision="fp32",
        reference=reference,
    )
    assert not report.passed and report.unexplained > 0
    assert "without a near-tie" in report.failures[0]


def test_near_ties_are_told_apart_from_defects() -> None:
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    latents = torch.tensor([[[[0.5, 0.5], [0.9, 0.1]]]])  # first: equidistant from codes 0 and 1
    reference = Reference(latents, np.array([[[0, 0]]]), np.zeros((1, 1, 1, 3), np.uint8))
    ties, unexplained, _ = classify_mismatches(reference, codebook, np.array([[[1, 2]]]), rtol=1e-5)
    assert (ties, unexplained) == (1, 1)


def test_failed_parity_fails_the_export_and_publishes_nothing(
    trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from vqtool import precisions

    impossible = precisions.ParityRule(tie_rtol=1e-5, max_abs_diff=-1)
    monkeypatch.setitem(precisions.TABLE, "fp32", replace(precisions.TABLE["fp32"], rule=impossible))
    images = held_out_images(load_checkpoint(trained_checkpoint), log=lambda _: None)[:32]
    with pytest.raises(ParityFailed, match="parity failed"):
        export_model(trained_checkpoint, tmp_path / "model", parity_images=images, log=lambda _: None)
    assert not (tmp_path / "model").exists()
    assert (tmp_path / "model.failed-parity" / "encoder.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model.failed-parity"]
