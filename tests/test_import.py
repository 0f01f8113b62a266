"""Imported tokenizers: diffusers' VQModel and transformers' JanusVQVAE, built here from the libraries' own classes
with seeded weights, their codebooks set from latents of real photographs (so that codes spread as in a trained
model), saved with save_pretrained, then imported, exported, encoded and decoded through the CLI and the API.
Codes are compared with the library's own encode path, reconstructions with its own decode from indices."""

from __future__ import annotations

import json
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


def make_vqmodel(folder: Path, **options: Any) -> Any:
    """A small diffusers VQModel (factor 4), seeded, saved in the library's layout under `folder`."""
    from diffusers import VQModel

    torch.manual_seed(0)
    model = VQModel(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=64,
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


def _near_ties_only(latents: torch.Tensor, book: torch.Tensor, ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Whether every code that differs is a near-tie: distances within rounding of each other (parity's rule)."""
    where = np.nonzero(ours != theirs)
    z = latents[where].double()
    a, b = book[torch.from_numpy(ours[where])].double(), book[torch.from_numpy(theirs[where])].double()
    gap = (((z - a) ** 2).sum(-1) - ((z - b) ** 2).sum(-1)).abs()
    scale = (z * z).sum(-1) + torch.maximum((a * a).sum(-1), (b * b).sum(-1))
    return bool((gap <= 1e-5 * scale).all())


def test_a_diffusers_vqmodel_imports_exports_encodes_and_decodes_as_the_library_does(tmp_path: Path) -> None:
    model = make_vqmodel(tmp_path / "vqgan")
    checkpoint, export = tmp_path / "vqgan.pt", tmp_path / "export"
    imported = run_cli("import", str(tmp_path / "vqgan"), "--out", str(checkpoint))
    assert imported.returncode == 0, imported.stderr
    assert "diffusers VQModel" in imported.stdout and "32x32 images -> 8x8 codes" in imported.stdout
    exported = run_cli("export", str(checkpoint), "--out", str(export))
    assert exported.returncode == 0, exported.stderr
    (report,) = [r for r in json.loads((export / "parity.json").read_text())["reports"] if r["precision"] == "fp32"]
    assert report["unexplained"] == 0 and report["recon_max_abs"] <= 1 and report["identical_fraction"] >= 0.99
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["model_config"]["library"] == "diffusers" and manifest["grid"] == 8

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
    [{"norm_type": "spatial", "mid_block_add_attention": False}, {"lookup_from_codebook": True}],
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
    assert said[0].startswith("quantizer: library") and "codes differently" in said[0]
    images = _photos(12, seed=4)
    with torch.no_grad():
        theirs = model.encode(_model_input(images)).image_tokens.reshape(len(images), SIZE // 2, SIZE // 2)
        ours = load_checkpoint(tmp_path / "library.pt").model.encode(_model_input(images))
    assert torch.equal(ours, theirs)
    exported = export_model(tmp_path / "original.pt", tmp_path / "export", log=lambda _: None)
    assert exported.verification.passed
    assert json.loads((tmp_path / "export" / "manifest.json").read_text())["model_config"]["quantizer"] == "original"


def test_import_refuses_what_it_cannot_read_in_one_line(tmp_path: Path) -> None:
    one_error_line(run_cli("import", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt")), "no such folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    refused = run_cli("import", str(tmp_path / "other"), "--out", str(tmp_path / "x.pt"))
    one_error_line(refused, "UNet2DModel", "vqtool imports diffusers VQModel")
    assert not (tmp_path / "x.pt").exists()
