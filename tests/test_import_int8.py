"""INT8 of imported tokenizers: calibrated on whole images at the model's size, handed to ONNX Runtime's
calibrator a memory budget at a time, and checked against the library's codes. Models are built as in
test_import.py (the libraries' own classes, seeded, saved with save_pretrained). A file of its own, so that the
parallel suite runs it beside test_import.py rather than after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import run_cli, write_photo_folder
from tests.test_import import SIZE, _model_input, _photos, make_vqmodel


def make_coarse_vqmodel(folder: Path) -> Any:
    """make_vqmodel with 16 codes at k-means centres of the photographs' latents, as far apart as INT8 needs: with
    seeded (untrained) weights, INT8 rounding moves latents across the boundaries of 64 codes too often, even with
    half the convolutions FP32."""
    from vqtool.train.codebook import kmeans

    model = make_vqmodel(folder, codes=16)
    with torch.no_grad():
        latents = model.encode(_model_input(_photos(48, seed=5))).latents.permute(0, 2, 3, 1).reshape(-1, 4)
        model.quantize.embedding.weight.copy_(kmeans(latents, 16, torch.Generator().manual_seed(1)))
    model.save_pretrained(folder)
    return model


def test_an_imported_model_calibrates_int8_on_whole_images_of_a_folder_at_its_size(tmp_path: Path) -> None:
    model = make_coarse_vqmodel(tmp_path / "vqgan")
    checkpoint, export, calibration = tmp_path / "vqgan.pt", tmp_path / "export", tmp_path / "calibration"
    assert run_cli("import", str(tmp_path / "vqgan"), "--out", str(checkpoint)).returncode == 0
    write_photo_folder(calibration, 48, seed=11)  # PNG, JPEG and WebP files of many sizes, none 32 x 32
    exported = run_cli(
        "export", str(checkpoint), "--out", str(export), "--int8", "--calibration", str(calibration),
        "--calibration-images", "40",
    )  # fmt: skip
    # Whole files, at most --calibration-images of them: not that many crops drawn from them.
    assert f"calibrating INT8 ranges on 40 images from {calibration}, at {SIZE}x{SIZE}" in exported.stderr
    assert "of codes as PyTorch's on 40 of the same images" in exported.stderr  # 16,384 codes would take 256
    assert "Collecting tensor data" not in exported.stdout  # ONNX Runtime's calibrator narration stays off stdout
    # Its seeded decoder was never trained to decode neighbouring codes alike, so the bounded contract's decode
    # limit may refuse the INT8 graph: the figures decide, and the export says which.
    assert exported.returncode == 0, exported.stderr
    reports = {r["precision"]: r for r in json.loads((export / "parity.json").read_text())["reports"]}
    refused = "refused: onnxruntime int8" in exported.stdout
    assert refused == (reports["int8"]["contract"] == "none"), exported.stdout
    assert reports["int8"]["identical_fraction"] >= 0.9 and reports["int8"]["rank_max"] <= 8
    if refused:
        return

    import vqtool

    images = _photos(16, seed=9)
    with torch.no_grad():
        library = model.quantize(model.encode(_model_input(images)).latents)[2][2].reshape(len(images), 8, 8)
    with vqtool.load(export, "onnxruntime", "cpu", precision="int8") as tok:
        assert (tok.encode(images).astype(np.int64) == library.numpy()).mean() >= 0.85


def test_int8_calibration_hands_onnx_runtime_a_budget_of_images_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime's histogram calibrator keeps every calibrated tensor of the images of one collect_data call:
    a 256 x 256 model's would not fit in memory, so images go to it in chunks that fit CALIBRATION_MEMORY."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    from vqtool.export import quantize
    from vqtool.export.graphs import write_graphs
    from vqtool.model.checkpoint import load_checkpoint
    from vqtool.model.importing import import_model

    make_vqmodel(tmp_path / "vqgan")
    import_model(tmp_path / "vqgan", tmp_path / "m.pt", log=lambda _: None)
    model = load_checkpoint(tmp_path / "m.pt").model
    fp32 = write_graphs(model, "test", tmp_path, "fp32")["encoder"]
    per_image = quantize.calibrated_bytes_per_image(tmp_path / fp32.file, SIZE, SIZE)
    assert per_image > 2 * fp32.activation_bytes  # the largest activation, and more beside it
    images = _photos(24, seed=2)
    given: list[int] = []  # images per collect_data call
    collect = HistogramCalibrater.collect_data

    def counted(self: Any, reader: Any) -> None:
        get_next, seen = reader.get_next, []

        def next_batch() -> Any:
            batch = get_next()
            seen.append(0 if batch is None else len(batch[fp32.input]))
            return batch

        reader.get_next = next_batch
        collect(self, reader)
        given.append(sum(seen))

    monkeypatch.setattr(HistogramCalibrater, "collect_data", counted)
    judge = quantize.bounded_judge(model, _photos(24, seed=3))
    whole = judge(tmp_path / quantize.write_int8_encoder(tmp_path, fp32, images).file)[0]
    assert given == [24]
    given.clear()
    monkeypatch.setattr(quantize, "CALIBRATION_MEMORY", 5 * per_image)
    chunked = judge(tmp_path / quantize.write_int8_encoder(tmp_path, fp32, images).file)[0]
    assert given == [5, 5, 5, 5, 4]
    assert chunked >= whole - 0.03  # histograms merged across chunks give ranges as good

    # The agreement runs PyTorch and each INT8 graph tried in batches that fit the activation budget, as encode
    # does: 35 photographs at 256 x 256 in one batch took 13 GB.
    from vqtool.formats.manifest import ACTIVATION_BUDGET, LIVE_ACTIVATIONS
    from vqtool.runtime.onnxruntime import OnnxRuntimeRunner

    batches: list[int] = []
    run = OnnxRuntimeRunner.__call__
    monkeypatch.setattr(OnnxRuntimeRunner, "__call__", lambda self, b: batches.append(len(b)) or run(self, b))
    large = ACTIVATION_BUDGET // (2 * LIVE_ACTIVATIONS)  # two images fit
    measured = quantize.bounded_judge(model, _photos(24, seed=3), activation_bytes=large)
    assert measured(tmp_path / "encoder.int8.onnx")[0] == chunked and batches == [2] * 12
