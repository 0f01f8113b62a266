"""Imported tokenizers: diffusers' VQModel and transformers' JanusVQVAE, built here from the libraries' own classes
with seeded weights, their codebooks set from latents of real photographs (so that codes spread as in a trained
model), saved with save_pretrained, then imported, exported, encoded and decoded through the CLI and the API.
Codes are compared with the library's own encode path, reconstructions with its own decode from indices."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import one_error_line, photo_crops, run_cli

SIZE = 32


def _photos(count: int, seed: int = 0) -> np.ndarray:
    """Real photographs, cropped and resized to SIZE x SIZE: uint8 N x SIZE x SIZE x 3."""
    return np.stack([np.asarray(Image.fromarray(c).resize((SIZE, SIZE))) for c in photo_crops(count, seed)])


def _model_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _seed_codebook(embedding: torch.nn.Embedding, latents: torch.Tensor) -> None:
    """Codes drawn from the latents of real photographs, as training leaves them: near the data."""
    flat = latents.reshape(-1, latents.shape[-1])
    picks = torch.randperm(len(flat), generator=torch.Generator().manual_seed(1))[: embedding.num_embeddings]
    with torch.no_grad():
        embedding.weight.copy_(flat[picks])


def make_vqmodel(folder: Path, codes: int = 64, **options: Any) -> Any:
    """A small diffusers VQModel (factor 4) with `codes` codes, seeded, saved in the library's layout under `folder`."""
    from diffusers import VQModel

    torch.manual_seed(0)
    model = VQModel(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=codes,
        norm_num_groups=8,
        sample_size=SIZE,
        **options,
    ).eval()
    with torch.no_grad():
        latents = model.encode(_model_input(_photos(48, seed=5))).latents.permute(0, 2, 3, 1)
    _seed_codebook(model.quantize.embedding, latents)
    model.save_pretrained(folder)
    return model


def make_janus(folder: Path) -> Any:
    """A small transformers JanusVQVAE (LlamaGen's VQ-16 design at factor 2), seeded, saved in its layout."""
    from transformers import JanusVQVAE, JanusVQVAEConfig

    torch.manual_seed(0)
    config = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=128,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 2],
        num_res_blocks=1,
        num_patches=SIZE // 2,
        projection_dim=32,
        image_token_embed_dim=32,
        num_hidden_layers=1,
    )
    model = JanusVQVAE(config).eval()
    with torch.no_grad():
        hidden = model.quant_conv(model.encoder(_model_input(_photos(48, seed=5))))
    _seed_codebook(model.quantize.embedding, hidden.permute(0, 2, 3, 1))
    model.save_pretrained(folder)
    return model


def make_emu3(folder: Path) -> Any:
    """A small transformers Emu3VQVAE (factor 2, four frames folded into one as for an image), seeded, saved in
    its layout with an image processor's settings beside it (CLIP's mean and std, not [-1, 1])."""
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(0)
    config = Emu3VQVAEConfig(
        codebook_size=96,
        embed_dim=4,
        latent_channels=4,
        base_channels=32,
        channel_multiplier=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[1],
        hidden_size=64,  # the attention's width: the deepest level's channels
        num_attention_heads=1,
    )
    model = Emu3VQVAE(config).eval()
    with torch.no_grad():
        frames = _emu3_input(_photos(48, seed=5)).unsqueeze(1).repeat(1, 4, 1, 1, 1)
        hidden = model.quant_conv(model.encoder(frames).permute(0, 2, 1, 3, 4))[:, :, 0]
    _seed_codebook(model.quantize.embedding, hidden.permute(0, 2, 3, 1))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(EMU3_PROCESSOR))
    return model


EMU3_PROCESSOR = {"rescale_factor": 1 / 255, "image_mean": [0.481, 0.458, 0.408], "image_std": [0.269, 0.261, 0.276]}


def _emu3_input(images: np.ndarray) -> torch.Tensor:
    """What Emu3's image processor gives for these settings: (pixel / 255 - mean) / std."""
    mean = torch.tensor(EMU3_PROCESSOR["image_mean"]).reshape(1, 3, 1, 1)
    std = torch.tensor(EMU3_PROCESSOR["image_std"]).reshape(1, 3, 1, 1)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std


def make_chameleon(folder: Path) -> Any:
    """A small transformers ChameleonVQVAE (factor 2, an encoder only), seeded, saved in its layout."""
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    torch.manual_seed(0)
    config = ChameleonVQVAEConfig(
        embed_dim=8,
        num_embeddings=128,
        latent_channels=8,
        base_channels=32,
        channel_multiplier=[1, 2],
        num_res_blocks=1,
        resolution=SIZE,
        attn_resolutions=[SIZE // 2],
    )
    model = ChameleonVQVAE(config).eval()
    with torch.no_grad():
        hidden = model.quant_conv(model.encoder(_chameleon_input(_photos(48, seed=5))))
    _seed_codebook(model.quantize.embedding, hidden.permute(0, 2, 3, 1))
    model.save_pretrained(folder)
    return model


def _chameleon_input(images: np.ndarray) -> torch.Tensor:
    """ChameleonImageProcessor's scaling: pixel * 0.0078 - 1."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() * 0.0078 - 1.0


def near_ties(latents: torch.Tensor, book: torch.Tensor, ours: np.ndarray, theirs: np.ndarray) -> torch.Tensor:
    """For each code that differs, whether it is a near-tie: the two codes' distances to the latent within rounding
    of each other (parity's FP32 rule: 1e-5 of |z|^2 + |e|^2)."""
    where = np.nonzero(ours != theirs)
    z = latents[where].double()
    a, b = book[torch.from_numpy(ours[where])].double(), book[torch.from_numpy(theirs[where])].double()
    gap = (((z - a) ** 2).sum(-1) - ((z - b) ** 2).sum(-1)).abs()
    scale = (z * z).sum(-1) + torch.maximum((a * a).sum(-1), (b * b).sum(-1))
    return gap <= 1e-5 * scale


def _near_ties_only(latents: torch.Tensor, book: torch.Tensor, ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Whether every code that differs is a near-tie."""
    return bool(near_ties(latents, book, ours, theirs).all())


def _batches_shrink_where_activations_are_large(export: Path) -> None:
    """A 256 x 256 latent-diffusion tokenizer holds ~32 MB per image in one activation: 64 of them at once would
    take gigabytes, so encode and decode batch fewer; small models keep the batch asked for."""
    from dataclasses import replace

    from vqtool.formats.manifest import ACTIVATION_BUDGET, LIVE_ACTIVATIONS, fitting_batch, read_manifest

    manifest = read_manifest(export)
    assert fitting_batch(manifest, "encoder", "fp32", 64) == 64  # 0.13 MB per image
    large = 128 * 256 * 256 * 4
    graphs = {name: replace(entry, activation_bytes=large) for name, entry in manifest.graphs.items()}
    big = replace(manifest, graphs=graphs)
    expected = ACTIVATION_BUDGET // (large * LIVE_ACTIVATIONS)
    assert 1 < expected < 64 and fitting_batch(big, "encoder", "fp32", 64) == expected
    assert fitting_batch(big, "decoder", "fp32", 2) == 2
    # Such graphs run without ONNX Runtime's memory pattern, which plans one block for all of a run's tensors,
    # and each batch whole on intra-op threads: in lanes, a batch of one image would leave the other core idle.
    from vqtool.runtime.select import open_runner

    for which, small in ((manifest, True), (big, False)):
        runner = open_runner(export, which, "encoder", backend="onnxruntime", device="cpu", threads=2).runner
        options = runner.session.get_session_options()  # type: ignore[attr-defined]
        assert options.enable_mem_pattern is small
        assert (runner.lanes, options.intra_op_num_threads) == ((2, 1) if small else (1, 2))  # type: ignore[attr-defined]


def test_a_diffusers_vqmodel_imports_exports_encodes_and_decodes_as_the_library_does(tmp_path: Path) -> None:
    model = make_vqmodel(tmp_path / "vqgan")
    checkpoint, export = tmp_path / "vqgan.pt", tmp_path / "export"
    imported = run_cli("import", str(tmp_path / "vqgan"), "--out", str(checkpoint))
    assert imported.returncode == 0, imported.stderr
    assert "diffusers VQModel" in imported.stdout and "32x32 images -> 8x8 codes" in imported.stdout
    # With the latent graphs that latent diffusion's pipelines call (which quantise the latents they decode).
    exported = run_cli("export", str(checkpoint), "--out", str(export), "--latents")
    assert exported.returncode == 0, exported.stderr
    (report,) = [r for r in json.loads((export / "parity.json").read_text())["reports"] if r["precision"] == "fp32"]
    assert report["unexplained"] == 0 and report["recon_max_abs"] <= 1 and report["identical_fraction"] >= 0.99
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["model_config"]["library"] == "diffusers" and manifest["grid"] == 8
    # The largest activation, measured at export: the first blocks' 32 channels at full resolution, in FP32.
    assert manifest["graphs"]["encoder"]["activation_bytes"] == 32 * SIZE * SIZE * 4
    _batches_shrink_where_activations_are_large(export)
    from tests.test_latents import check_latent_graphs

    check_latent_graphs(model, export, "quantize")

    images = _photos(24, seed=9)
    folder = tmp_path / "images"
    folder.mkdir()
    for index, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    encoded = run_cli("encode", str(folder), "--model", str(export), "--out", str(tmp_path / "codes.npy"))
    assert encoded.returncode == 0, encoded.stderr
    codes = np.load(tmp_path / "codes.npy").astype(np.int64)
    with torch.no_grad():
        latents = model.encode(_model_input(images)).latents
        library = model.quantize(latents)[2][2].reshape(len(images), 8, 8).numpy()
        # The library's own decode from indices: its codebook entries, decoded without quantizing again.
        entries = model.quantize.get_codebook_entry(torch.from_numpy(library).reshape(-1), (len(images), 8, 8, 4))
        expected = model.decode(entries, force_not_quantize=True).sample
    book = model.quantize.embedding.weight.detach()
    assert (codes == library).mean() >= 0.99
    assert _near_ties_only(latents.permute(0, 2, 3, 1), book, codes, library)

    np.save(tmp_path / "library.npy", library.astype(np.uint8))
    decoded = run_cli("decode", str(tmp_path / "library.npy"), "--model", str(export), "--out", str(tmp_path / "png"))
    assert decoded.returncode == 0, decoded.stderr
    ours = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "png").glob("*.png"))]).astype(int)
    theirs = ((expected.permute(0, 2, 3, 1) + 1.0) * 127.5).clamp(0, 255).round().numpy().astype(int)
    assert np.abs(ours - theirs).max() <= 2

    import vqtool

    with vqtool.load(export, "onnxruntime", "cpu") as tok:
        assert np.array_equal(tok.encode(images).astype(np.int64), codes)
        # --crop center: the centre square of the short side, as these tokenizers were trained; plain resize
        # squeezes the whole image instead.
        wide = np.concatenate([images[0], images[1]], axis=1)
        centre = tok.encode(wide[None, :, SIZE // 2 : SIZE // 2 + SIZE])
        assert np.array_equal(tok.encode([wide], crop="center"), centre)
        assert not np.array_equal(tok.encode([wide]), centre)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    cropped = run_cli(
        "encode",
        str(tmp_path / "wide.png"),
        "--model",
        str(export),
        "--out",
        str(tmp_path / "w.npy"),
        "--crop",
        "center",
    )
    assert cropped.returncode == 0, cropped.stderr
    assert np.array_equal(np.load(tmp_path / "w.npy"), centre)


@pytest.mark.parametrize(
    "options",
    [
        # MoVQ's export and FP32 parity are also the latent tests' (test_latents.py), with its latent graphs.
        pytest.param({"norm_type": "spatial", "mid_block_add_attention": False}, marks=pytest.mark.slow),
        {"lookup_from_codebook": True},
    ],
    ids=["movq-spatial-norm", "amused-lookup"],
)
def test_diffusers_variants_export_with_parity(options: dict[str, Any], tmp_path: Path) -> None:
    """MoVQ's spatial norm (the decoder conditioned on the codes) and aMUSEd's lookup_from_codebook."""
    from vqtool.export.pipeline import export_model
    from vqtool.model.checkpoint import load_checkpoint
    from vqtool.model.importing import import_model

    model = make_vqmodel(tmp_path / "pipeline" / "movq", **options)
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    result = import_model(tmp_path / "pipeline", tmp_path / "m.pt", log=lambda _: None)
    assert result.folder.name == "movq"  # found in the pipeline folder by itself
    loaded = load_checkpoint(tmp_path / "m.pt").model
    images = torch.from_numpy(_photos(16, seed=3))
    with torch.no_grad():
        codes = loaded.encode(_model_input(images.numpy()))
        library = model.quantize(model.encode(_model_input(images.numpy())).latents)[2][2].reshape(codes.shape)
    assert torch.equal(codes, library)
    exported = export_model(tmp_path / "m.pt", tmp_path / "export", log=lambda _: None)
    fp32 = [r for r in exported.verification.reports if r.precision == "fp32"]
    assert fp32 and all(r.passed and r.unexplained == 0 for r in fp32)
    assert all(r.passed for r in exported.verification.reports)


def test_janus_imports_with_either_quantizer_and_says_how_many_codes_they_change(tmp_path: Path) -> None:
    from vqtool.export.pipeline import export_model
    from vqtool.model.checkpoint import load_checkpoint
    from vqtool.model.importing import import_model

    model = make_janus(tmp_path / "janus")
    said: list[str] = []
    library = import_model(tmp_path / "janus", tmp_path / "library.pt", log=said.append)
    original = import_model(tmp_path / "janus", tmp_path / "original.pt", quantizer="original", log=said.append)
    assert (library.config.grid, original.config.quantizer) == (SIZE // 2, "original")
    assert said[0].startswith("input: pixel x 0.00784314 + -1 per channel")
    assert said[1].startswith("quantizer: library") and "codes differently" in said[1]
    assert int(re.search(r"gives (\d+) of", said[1]).group(1)) > 0  # the toy's codes are raw latents
    # Stored at unit length, the codes rank the same under both searches: the question is settled by the lengths.
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(torch.nn.functional.normalize(model.quantize.embedding.weight, dim=-1))
    model.save_pretrained(tmp_path / "unit")
    import_model(tmp_path / "unit", tmp_path / "unit.pt", log=said.append)
    assert "gives 0 of" in said[-1] and "code lengths 1 to 1" in said[-1]
    model = make_janus(tmp_path / "janus")  # the raw codes again
    images = _photos(12, seed=4)
    with torch.no_grad():
        theirs = model.encode(_model_input(images)).image_tokens.reshape(len(images), SIZE // 2, SIZE // 2)
        ours = load_checkpoint(tmp_path / "library.pt").model.encode(_model_input(images))
    assert torch.equal(ours, theirs)
    exported = export_model(tmp_path / "original.pt", tmp_path / "export", log=lambda _: None)
    assert exported.verification.passed
    assert json.loads((tmp_path / "export" / "manifest.json").read_text())["model_config"]["quantizer"] == "original"
    # An imported model is not vqtool's to train: resuming a folder that holds one is refused in one line.
    from vqtool.errors import VqtoolError
    from vqtool.train.run import CHECKPOINT_NAME, resume_run

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes((tmp_path / "library.pt").read_bytes())
    with pytest.raises(VqtoolError, match="run: holds an imported model, which vqtool does not train"):
        resume_run(tmp_path / "run")


def test_import_refuses_what_it_cannot_read_in_one_line(tmp_path: Path) -> None:
    one_error_line(run_cli("import", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt")), "no such folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    refused = run_cli("import", str(tmp_path / "other"), "--out", str(tmp_path / "x.pt"))
    one_error_line(refused, "UNet2DModel", "vqtool imports diffusers VQModel")
    assert not (tmp_path / "x.pt").exists()


def test_emu3_imports_with_its_image_processor_scaling_and_encodes_and_decodes_as_the_library(tmp_path: Path) -> None:
    import vqtool

    model = make_emu3(tmp_path / "emu3")
    checkpoint, export = tmp_path / "emu3.pt", tmp_path / "export"
    imported = run_cli("import", str(tmp_path / "emu3"), "--out", str(checkpoint), "--image-size", str(SIZE))
    assert imported.returncode == 0, imported.stderr
    assert "preprocessor_config.json" in imported.stdout + imported.stderr
    exported = run_cli("export", str(checkpoint), "--out", str(export), "--fp16")
    assert exported.returncode == 0, exported.stderr
    assert "TensorRT will not build" not in exported.stdout + exported.stderr  # its operators are all in the matrix
    reports = {r["precision"]: r for r in json.loads((export / "parity.json").read_text())["reports"]}
    assert reports["fp32"]["unexplained"] == 0 and reports["fp32"]["recon_max_abs"] <= 2
    assert reports["fp16"]["passed"]

    images = _photos(12, seed=4)
    with torch.no_grad():
        sizes = torch.tensor([[SIZE, SIZE]] * len(images))
        library = torch.stack(model.encode(_emu3_input(images), image_sizes=sizes).image_tokens).numpy()
        decoded = model.decode(torch.from_numpy(library))
    mean = torch.tensor(EMU3_PROCESSOR["image_mean"]).reshape(1, 3, 1, 1)
    std = torch.tensor(EMU3_PROCESSOR["image_std"]).reshape(1, 3, 1, 1)
    expected = ((decoded * std + mean) * 255).clamp(0, 255).round().permute(0, 2, 3, 1).numpy()
    with vqtool.load(export, "onnxruntime", "cpu") as tok:
        codes = tok.encode(images).astype(np.int64)
        assert (codes == library).mean() >= 0.99
        assert np.abs(tok.decode(library).astype(int) - expected.astype(int)).max() <= 2


def test_chameleon_exports_as_an_encoder_only_and_decode_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vqtool
    from vqtool.errors import VqtoolError

    model = make_chameleon(tmp_path / "chameleon")
    checkpoint, export = tmp_path / "chameleon.pt", tmp_path / "export"
    imported = run_cli("import", str(tmp_path / "chameleon"), "--out", str(checkpoint))
    assert imported.returncode == 0, imported.stderr
    assert "0.0078 + -1 per channel (ChameleonVQVAE's image processor defaults)" in imported.stdout + imported.stderr
    exported = run_cli("export", str(checkpoint), "--out", str(export))
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads((export / "manifest.json").read_text())
    assert sorted(manifest["graphs"]) == ["encoder"] and not (export / "decoder.onnx").exists()
    (report,) = json.loads((export / "parity.json").read_text())["reports"]
    assert report["passed"] and report["unexplained"] == 0 and report["decoded"] == "none"

    images = _photos(12, seed=4)
    with torch.no_grad():
        library = model.encode(_chameleon_input(images)).image_tokens.reshape(len(images), SIZE // 2, SIZE // 2)
    with vqtool.load(export, "onnxruntime", "cpu") as tok:
        assert not tok.has_decoder
        assert (tok.encode(images).astype(np.int64) == library.numpy()).mean() >= 0.99
        with pytest.raises(VqtoolError, match="ChameleonVQVAE has no decoder"):
            tok.decode(library.numpy())
    np.save(tmp_path / "codes.npy", library.numpy().astype(np.uint8))
    refused = run_cli("decode", str(tmp_path / "codes.npy"), "--model", str(export), "--out", str(tmp_path / "png"))
    one_error_line(refused, "ChameleonVQVAE has no decoder")
    checked = run_cli("parity", str(export), "--backend", "onnxruntime")
    assert checked.returncode == 0, checked.stderr
    # Latents need a decoder too: asked for them, the export is refused before any graph, and nothing is written.
    from vqtool.export import pipeline

    monkeypatch.setattr(pipeline, "write_graphs", lambda *_: pytest.fail("a graph was exported before the refusal"))
    with pytest.raises(VqtoolError, match="ChameleonVQVAE has no decoder: --latents needs one"):
        pipeline.export_model(checkpoint, tmp_path / "e", latents=True, log=lambda _: None)
    assert not (tmp_path / "e").exists()
