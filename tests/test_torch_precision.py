"""The PyTorch runtime at a reduced precision: its bodies under autocast, its quantizer in FP32, judged by parity under
the contracts like every other runtime, and started only where parity.json allows it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import one_error_line, run_cli
from vqtool.formats.manifest import read_manifest
from vqtool.model.vqvae import code_distances
from vqtool.runtime.pytorch import TorchRunner


def _bf16_here() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


needs_bf16 = pytest.mark.skipif(not _bf16_here(), reason="this CPU has no BF16 arithmetic for PyTorch")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from vqtool.train.data.memory import default_training_set

    return default_training_set(32).batch(0, 256, seed=11)


def _output_dtypes(module: nn.Module, kind: type[nn.Module]) -> tuple[set[torch.dtype], list[object]]:
    dtypes: set[torch.dtype] = set()
    handles = [
        layer.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        for layer in module.modules()
        if isinstance(layer, kind)
    ]
    return dtypes, handles


@needs_bf16
def test_bf16_runs_the_encoder_body_in_bf16_and_the_search_in_fp32(export_dir: Path, images: np.ndarray) -> None:
    runner = TorchRunner(export_dir, read_manifest(export_dir), "encoder", "cpu", "bf16")
    assert "BF16 autocast with the quantizer in FP32" in runner.provider
    parts = runner.parts
    dtypes, handles = _output_dtypes(parts.encoder_body, nn.Conv2d)
    codes = runner(images)
    for handle in handles:
        handle.remove()
    assert dtypes == {torch.bfloat16}
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents = parts.encoder_body(parts.input_scaling(torch.from_numpy(images)))
        latents = latents.float()
        book = parts.search_codebook
        fp32_search = torch.argmin(code_distances(latents, book), dim=-1).numpy()
        bf16_search = torch.argmin(code_distances(latents.bfloat16(), book.bfloat16()), dim=-1).numpy()
    # A search in BF16 would move codes on these latents (checked first); the runner's is FP32's, code for code.
    assert (bf16_search != fp32_search).any()
    assert codes.dtype == np.int32 and np.array_equal(codes, fp32_search)
    # The rounding of the body moves few of the FP32 model's codes, if any.
    fp32_codes = TorchRunner(export_dir, read_manifest(export_dir), "encoder", "cpu")(images)
    assert (codes == fp32_codes).mean() > 0.8


@needs_bf16
def test_bf16_looks_codes_up_in_fp32_and_decodes_in_bf16(export_dir: Path) -> None:
    manifest = read_manifest(export_dir)
    runner = TorchRunner(export_dir, manifest, "decoder", "cpu", "bf16")
    parts = runner.parts
    seen: list[torch.Tensor] = []
    before = parts.decoder_body.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    dtypes, handles = _output_dtypes(parts.decoder_body, nn.ConvTranspose2d)
    codes = np.random.default_rng(0).integers(0, manifest.codes, (16, manifest.grid, manifest.grid), dtype=np.int32)
    images = runner(codes)
    for handle in (before, *handles):
        handle.remove()
    vectors = parts.decode_codebook[torch.from_numpy(codes.astype(np.int64))]
    if parts.lookup_suffix is not None:
        vectors = parts.lookup_suffix(vectors)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], vectors)
    assert dtypes == {torch.bfloat16}
    exact = TorchRunner(export_dir, manifest, "decoder", "cpu")(codes)
    difference = np.abs(images.astype(np.int16) - exact)
    assert images.dtype == np.uint8 and 0 < difference.max() <= 16


def test_fp16_is_for_cuda_only(export_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "encode", str(tmp_path), "--model", str(export_dir), "--out", str(tmp_path / "c.npy"),
        "--backend", "torch", "--device", "cpu", "--precision", "fp16",
    )  # fmt: skip
    one_error_line(result, "--backend torch runs fp16 on a CUDA GPU only")


@needs_bf16
def test_parity_publishes_pytorch_bf16_and_encode_obeys_it(export_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    export = tmp_path / "export"
    shutil.copytree(export_dir, export)
    folder = tmp_path / "photos"
    folder.mkdir()
    from vqtool.train.data.memory import default_training_set

    for index, crop in enumerate(default_training_set(32).batch(0, 12, seed=3)):
        Image.fromarray(crop).save(folder / f"{index:02d}.png")
    result = run_cli("parity", str(export), "--backend", "torch", "--precision", "bf16")
    reports = json.loads((export / "parity.json").read_text())["reports"]
    ours = [r for r in reports if (r["runtime"], r["precision"]) == ("torch", "bf16")]
    assert len(ours) == 1 and "BF16 autocast" in ours[0]["provider"] and ours[0]["batch_sizes"]
    report = ours[0]
    assert {r["runtime"] for r in reports} >= {"onnxruntime", "torch"}  # export's reports are kept
    assert result.returncode == (1 if report["contract"] == "none" else 0), result.stderr

    def encode(out: str) -> object:
        return run_cli(
            "encode", str(folder), "--model", str(export), "--out", str(tmp_path / out),
            "--backend", "torch", "--precision", "bf16",
        )  # fmt: skip

    if report["contract"] != "none":
        done = encode("c.npy")
        assert done.returncode == 0, done.stderr
        contract = json.loads((tmp_path / "c.json").read_text())["contract"]
        assert (contract["name"], contract["backend"], contract["precision"]) == (report["contract"], "torch", "bf16")
        assert contract["identical_fraction"] == report["identical_fraction"]
    saved = json.loads((export / "parity.json").read_text())
    refused = {**report, "contract": "none", "passed": False, "failures": ["bounded: a changed code ranks 99 (> 8)"]}
    others = [r for r in reports if r is not report and (r["runtime"], r["precision"]) != ("torch", "bf16")]
    (export / "parity.json").write_text(json.dumps({**saved, "reports": [*others, refused]}))
    one_error_line(encode("d.npy"), "torch bf16 met no contract on this export", "ranks 99")
    assert not (tmp_path / "d.npy").exists()
