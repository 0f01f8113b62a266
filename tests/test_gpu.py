"""On a CUDA GPU: training runs there, and the model's codes on CUDA are FP32's (TF32 off), tie for tie.

Skipped with the reason where no GPU is present; scripts/gpu-check.sh runs these with the rest of the GPU checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from vqtool.errors import VqtoolError
from vqtool.export.parity import classify_mismatches, torch_reference
from vqtool.formats.manifest import read_manifest
from vqtool.model.checkpoint import load_checkpoint
from vqtool.precisions import TABLE
from vqtool.runtime.pytorch import TorchRunner
from vqtool.runtime.select import open_runner
from vqtool.train.data.run_data import held_out_images


@pytest.mark.gpu
def test_training_on_cuda_writes_a_checkpoint_that_exports(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = run_cli("train", "--steps", "50", "--batch-size", "64", "--device", "cuda", "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 50 and np.isfinite(metrics[-1]["val_mse"])
    assert run_cli("export", str(run / "checkpoint.pt"), "--out", str(tmp_path / "model")).returncode == 0


@pytest.mark.gpu
def test_cuda_codes_are_the_cpu_codes_up_to_near_ties(export_dir: Path) -> None:
    manifest = read_manifest(export_dir)
    checkpoint = load_checkpoint(export_dir / "model.pt")
    images = held_out_images(checkpoint, log=lambda _: None)
    reference = torch_reference(checkpoint.model, images)
    codebook = checkpoint.model.quantizer.search_codebook().detach()
    runners = [TorchRunner(export_dir, manifest, "encoder", "cuda")]
    try:  # ONNX Runtime's CUDA provider, where onnxruntime-gpu and its CUDA libraries are present
        runners.append(open_runner(export_dir, manifest, "encoder", backend="onnxruntime", device="cuda").runner)
    except VqtoolError as exc:
        print(f"ONNX Runtime CUDA not checked: {exc}")
    for runner in runners:
        _, unexplained, _ = classify_mismatches(reference, codebook, runner(images), TABLE["fp32"].rule.tie_rtol)
        assert unexplained == 0, runner.describe()
    decoded = TorchRunner(export_dir, manifest, "decoder", "cuda")(reference.codes.astype(np.int32))
    assert np.abs(decoded.astype(int) - reference.reconstructions.astype(int)).max() <= 1
