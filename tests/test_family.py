"""The model family: factors 8/4/2, residual blocks, factorized and l2-normalised codes, presets.

Each factor alone (each other option alone with -m slow) and all of them together, on trained models (an untrained
codebook hides near-ties), exported and held to the same parity tolerances as the reference design.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import EVERYTHING, SMALL, run_cli, train_small
from vqtool.export.graphs import write_graphs
from vqtool.export.parity import check_parity
from vqtool.export.tensorrt_ops import trt_problems
from vqtool.model.checkpoint import load_checkpoint
from vqtool.model.config import ModelConfig
from vqtool.model.vqvae import VQVAE
from vqtool.runtime.onnxruntime import OnnxRuntimeRunner
from vqtool.train.data.memory import default_training_set

ALONE = {
    "factor 8": {"downsample": 8},
    "factor 2": {"downsample": 2, "channels": (16, 32)},
    "residual blocks": {"res_blocks": 2},
    "factorized codes": {"lookup_dim": 8},
    "l2 codes": {"l2_codes": True},
}


@pytest.fixture(scope="module")
def photos():  # noqa: ANN201
    return default_training_set(32)


def test_the_default_is_still_exactly_the_article_model() -> None:
    model = VQVAE(ModelConfig())
    layers = [type(m).__name__ for m in [*model.encoder, model.before_quantize, model.after_quantize, *model.decoder]]
    assert layers == ["Conv2d", "ReLU"] * 3 + ["Conv2d", "ConvTranspose2d"] + ["ConvTranspose2d", "Tanh"] * 2 + [
        "ConvTranspose2d"
    ]
    assert sum(p.numel() for p in model.parameters()) == 1_445_571  # every parameter of the printed design
    # A checkpoint's configuration from before these options existed rebuilds the same model.
    old = {"codes": 256, "dim": 256, "image_size": 32, "channels": [32, 64, 128]}
    assert ModelConfig.from_dict(old) == ModelConfig()


@pytest.mark.parametrize("options", [*ALONE.values(), EVERYTHING], ids=[*ALONE, "everything"])
def test_each_option_shapes_the_model_as_it_says(options: dict[str, object]) -> None:
    config = ModelConfig(**{**SMALL, **options})
    model = VQVAE(config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    result = model(images)
    side = 32 // config.downsample
    assert result.codes.shape == (2, side, side) and result.reconstruction.shape == images.shape
    assert result.latents.shape[-1] == config.search_dim
    if config.l2_codes:
        norms = model.quantizer.search_codebook().norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        assert torch.allclose(result.latents.norm(dim=-1), torch.ones(2, side, side), atol=1e-5)
    (result.recon_loss + result.codebook_loss + 0.25 * result.commit_loss).backward()
    # Straight-through: the encoder (and the projection into the lookup space) learn from the decoder.
    assert model.encoder[0].weight.grad.abs().sum() > 0
    if config.lookup_dim:
        assert model.quantizer.project_in.weight.grad.abs().sum() > 0
        assert model.quantizer.project_out.weight.grad.abs().sum() > 0


# The factors run alone only; the other options run together in EVERYTHING (int8_export), so alone they are slow.
@pytest.mark.parametrize(
    "options",
    [pytest.param(o, marks=[] if "downsample" in o else [pytest.mark.slow]) for o in ALONE.values()],
    ids=list(ALONE),
)
def test_each_option_alone_exports_with_fp32_parity(photos, options: dict[str, object], tmp_path: Path) -> None:  # noqa: ANN001
    checkpoint = load_checkpoint(train_small(tmp_path / "run", options, steps=40))
    model = checkpoint.model
    entries = write_graphs(model, "test", tmp_path, "fp32")
    for entry in entries.values():
        import onnx

        assert trt_problems(onnx.load(str(tmp_path / entry.file))) == []
    images = photos.val[:128]
    encoder = OnnxRuntimeRunner(tmp_path / entries["encoder"].file, "cpu")
    decoder = OnnxRuntimeRunner(tmp_path / entries["decoder"].file, "cpu")
    report = check_parity(
        model, images, encoder, decoder, runtime="onnxruntime", provider=encoder.provider, precision="fp32"
    )
    assert report.passed, report.failures
    assert len(np.unique(encoder(images))) > 3  # trained: the comparison is not trivial


def test_int8_keeps_the_first_convolutions_fp32_until_codes_agree(
    int8_export: Path,
    photos,  # noqa: ANN001
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vqtool.export import quantize

    model = load_checkpoint(int8_export / "model.pt").model
    fp32 = write_graphs(model, "test", tmp_path, "fp32")["encoder"]
    calibration = photos.batch(0, 256, seed=quantize.CALIBRATION_SEED)
    held_out = photos.batch(0, 256, seed=quantize.AGREEMENT_SEED)
    convolutions = quantize.convolutions_of(tmp_path / fp32.file)
    most = len(convolutions) // 2
    shares = []
    measure = quantize.bounded_judge(model, held_out)
    for kept in range(most + 1):
        entry = quantize.write_int8_encoder(tmp_path, fp32, calibration, keep_fp32=convolutions[:kept])
        shares.append(measure(tmp_path / entry.file)[0])
    assert shares[0] < max(shares)  # all-INT8 moves codes that keeping convolutions FP32 keeps: the search bites
    # A bounded rule that only the share of identical codes decides, set between what the prefixes give.
    target = (shares[0] + max(shares)) / 2
    loose = quantize.SEARCH_RULE.__class__(max_regret_p99=1e9, max_rank=10**9, min_drift_psnr=-1e9)
    monkeypatch.setattr(quantize, "SEARCH_RULE", loose)
    judge = quantize.bounded_judge(model, held_out, min_identical=target)
    said: list[str] = []
    entry = quantize.write_checked_int8_encoder(tmp_path, fp32, calibration, judge, said.append)
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / entry.file)).metadata_props}
    kept = int(metadata[quantize.FP32_CONVOLUTIONS_KEY])
    # The prefix where agreement crosses the target (bisection finds the first one where it only grows).
    assert shares[kept] >= target and (kept == 0 or shares[kept - 1] < target)
    assert f"the first {kept} of {len(convolutions)} convolutions FP32" in said[0]


def test_every_option_together_passes_parity_in_fp32_fp16_and_int8(int8_export: Path) -> None:
    reports = {r["precision"]: r for r in json.loads((int8_export / "parity.json").read_text())["reports"]}
    assert set(reports) == {"fp32", "fp16", "int8"} and all(r["passed"] for r in reports.values())
    assert reports["fp32"]["unexplained"] == 0 and reports["fp32"]["recon_max_abs"] <= 1
    assert reports["fp32"]["contract"] == "exact" and reports["int8"]["contract"] == "bounded"
    manifest = json.loads((int8_export / "manifest.json").read_text())
    assert manifest["grid"] == 8 and manifest["model_config"]["lookup_dim"] == 8


def test_encode_and_decode_a_factor_4_export_from_files(int8_export: Path, mixed_folder: Path, tmp_path: Path) -> None:
    codes = tmp_path / "codes.npy"
    encoded = run_cli("encode", str(mixed_folder), "--model", str(int8_export), "--out", str(codes))
    assert encoded.returncode == 0, encoded.stderr
    assert np.load(codes).shape == (8, 8, 8)
    torch_codes = tmp_path / "torch.npy"
    args = ("--model", str(int8_export), "--out", str(torch_codes), "--backend", "torch")
    assert run_cli("encode", str(mixed_folder), *args).returncode == 0
    assert (np.load(codes) == np.load(torch_codes)).mean() > 0.99  # ties aside, the graph is the model
    decoded = run_cli("decode", str(codes), "--model", str(int8_export), "--out", str(tmp_path / "recon"))
    assert decoded.returncode == 0, decoded.stderr
    assert len(list((tmp_path / "recon").glob("*.png"))) == 8


def _restarts(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["restarts"]


def test_presets_set_the_family_and_explicit_options_win(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ("--preset", "f8", "--codes", "64", "--steps", "2", "--batch-size", "8", "--device", "cpu")
    result = run_cli("train", *args, "--out", str(run))
    assert result.returncode == 0, result.stderr
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint.model_config.downsample == 8 and checkpoint.model_config.codes == 64
    assert checkpoint.model_config.l2_codes and checkpoint.model_config.lookup_dim == 8
    preset_training = {
        "restart_dead": 70,
        "rotation_trick": True,
        "adam_beta2": 0.95,
        "lr": 2e-3,
        "cooldown_steps": 200,
        "average_weights": 0.99,
        "usage_loss": 0.003,
    }
    assert {k: getattr(checkpoint.train_config, k) for k in preset_training} == preset_training
    # Each training option the preset sets changes the weights a run reaches, and an explicit value beats the preset's.
    preset_weights = checkpoint.model.encoder[0].weight.detach()
    overrides = {
        "restart_dead": ("--restart-dead", "1"),
        "rotation_trick": ("--straight-through",),
        "adam_beta2": ("--adam-beta2", "0.999"),
        "lr": ("--lr", "1e-3"),
        "cooldown_steps": ("--cooldown-steps", "0"),
        "average_weights": ("--average-weights", "0"),
        "usage_loss": ("--usage-loss", "0"),
    }
    # The same option parsing in this process (Typer's runner): a subprocess per run would cost its start-up.
    from typer.testing import CliRunner

    from vqtool.cli import app

    def train_here(*more: str) -> None:
        result = CliRunner().invoke(app, ["train", *args, *more])
        assert result.exit_code == 0, result.output

    for name, extra in overrides.items():
        out = tmp_path / name
        train_here(*extra, "--seed", "0", "--out", str(out))
        saved = load_checkpoint(out / "checkpoint.pt")
        given = {k: getattr(saved.train_config, k) for k in preset_training}
        assert given == {**preset_training, name: given[name]} and given[name] != preset_training[name], name
        if name == "restart_dead":  # codes are re-seeded after a step: two steps show it in the count, not the weights
            assert _restarts(out) > _restarts(run), name
        else:
            assert not torch.equal(saved.model.encoder[0].weight.detach(), preset_weights), name
    train_here("--lr-schedule", "cosine", "--out", str(tmp_path / "cosine"))  # the preset's cool-down yields to it
    assert load_checkpoint(tmp_path / "cosine" / "checkpoint.pt").train_config.cooldown_steps == 0
    refused = run_cli("train", "--preset", "f3", "--steps", "1", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "f3" in refused.stderr  # a typo is refused before any work
    bad = run_cli("train", "--downsample", "3", "--steps", "1", "--out", str(tmp_path / "y"))
    assert bad.returncode == 1 and "downsample must be one of 16, 8, 4, 2" in bad.stderr
