"""Original checkpoints, as their authors publish them: LlamaGen's `.pt`, DeepSeek's Janus folder (the VQ model
inside the multimodal checkpoint's safetensors shards) and a taming / latent-diffusion Lightning `.ckpt` with its
YAML. Each is built here from an independent port of the original code (tests/reference/), with seeded weights and
a codebook whose rows are not of unit length (as trained ones are not), saved in the original's file format,
imported, exported, and compared with the original's own codes and decode on real photographs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import one_error_line, run_cli
from tests.reference import llamagen, taming
from tests.test_import import SIZE, _model_input, _near_ties_only, _photos

PAYLOAD_FILE = "payload-ran"


def _codebook_from(embedding: torch.nn.Embedding, latents: torch.Tensor) -> None:
    """Codes drawn from the latents of real photographs (so codes spread as in a trained model), each row then
    scaled to a length of its own between 0.5 and 2: trained codebooks are not of unit length."""
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    generator = torch.Generator().manual_seed(1)
    picks = torch.randperm(len(flat), generator=generator)[: embedding.num_embeddings]
    lengths = 0.5 + 1.5 * torch.rand(len(picks), 1, generator=generator)
    with torch.no_grad():
        embedding.weight.copy_(flat[picks] / flat[picks].norm(dim=-1, keepdim=True) * lengths)


def small_llamagen() -> Any:
    """LlamaGen's VQ model at factor 2 with 32 channels: its own classes, its own weight names."""
    torch.manual_seed(0)
    args = llamagen.ModelArgs(codebook_size=128, codebook_embed_dim=8, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2])
    args.z_channels = 32
    model = llamagen.VQModel(args)
    model.encoder = llamagen.Encoder(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32)
    model.decoder = llamagen.Decoder(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32)
    model.quant_conv = torch.nn.Conv2d(32, 8, 1)
    model.post_quant_conv = torch.nn.Conv2d(8, 32, 1)
    model.eval()
    with torch.no_grad():
        latents = model.quant_conv(model.encoder(_model_input(_photos(48, seed=5))))
    _codebook_from(model.quantize.embedding, latents)
    return model


TAMING_CONFIG: dict[str, Any] = {
    "double_z": False,
    "z_channels": 8,
    "resolution": SIZE,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [SIZE // 2],  # attention inside the deepest level too, as taming's f16 VQGAN has
    "dropout": 0.0,
}


def small_taming() -> Any:
    torch.manual_seed(0)
    model = taming.VQModel(TAMING_CONFIG, n_embed=128, embed_dim=8).eval()
    with torch.no_grad():
        latents = model.quant_conv(model.encoder(_model_input(_photos(48, seed=5))))
    _codebook_from(model.quantize.embedding, latents)
    return model


class RunsWhenBuilt:
    """A callback as a training script's own class: a full unpickle rebuilds it, and its state runs code."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state["folder"], PAYLOAD_FILE).write_text("ran")


class RunsWhenCalled:
    """What an attacker pickles: a call of exec with a string."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(Path(self.folder, PAYLOAD_FILE))!r}, 'w').write('ran')",))


def lightning_checkpoint(model: Any, path: Path, payload_folder: Path) -> None:
    """A checkpoint as PyTorch Lightning writes it: the weights under state_dict beside the loss's (a discriminator),
    optimizer states, callbacks keyed by their class, and hyper-parameter objects, two of which run code when a
    full unpickle builds them."""
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    torch.save(
        {
            "epoch": 3,
            "global_step": 1200,
            "pytorch-lightning_version": "1.0.8",
            "state_dict": state,
            "callbacks": {RunsWhenBuilt: {"best_model_score": torch.tensor(0.1)}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(64, 3, 4, 4)}}, "param_groups": []}],
            "lr_schedulers": [],
            "hyper_parameters": {
                "monitor": RunsWhenBuilt(str(payload_folder)),
                "hook": RunsWhenCalled(str(payload_folder)),
            },
        },
        path,
    )


def taming_yaml(path: Path, ddconfig: dict[str, Any], n_embed: int, embed_dim: int, **params: Any) -> None:
    model = {
        "base_learning_rate": 4.5e-6,
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": embed_dim,
            "n_embed": n_embed,
            "monitor": "val/rec_loss",
            "ddconfig": ddconfig,
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {}},
            **params,
        },
    }
    path.write_text(yaml.safe_dump({"model": model}))


def _matches_the_original(export: Path, model: Any, module: Any, cosine: bool) -> None:
    """The export's codes of real photographs are the original code's (near-ties aside, none expected), and its
    decode of the original's codes is the original's decode, to within a grey level."""
    import vqtool

    images = _photos(24, seed=9)
    with torch.no_grad():
        expected = module.codes(model, _model_input(images)).numpy()
        pictures = module.decode_codes(model, torch.from_numpy(expected))
        latents = model.quant_conv(model.encoder(_model_input(images))).permute(0, 2, 3, 1)
    with vqtool.load(export, "onnxruntime", "cpu") as tok:
        codes = tok.encode(images).astype(np.int64)
        decoded = tok.decode(expected).astype(int)
    book = model.quantize.embedding.weight.detach()
    if cosine:
        latents, book = torch.nn.functional.normalize(latents, dim=-1), torch.nn.functional.normalize(book, dim=-1)
    assert (codes == expected).mean() >= 0.99, (codes == expected).mean()
    assert _near_ties_only(latents, book, codes, expected)
    theirs = ((pictures.permute(0, 2, 3, 1) + 1.0) * 127.5).clamp(0, 255).round().numpy().astype(int)
    assert np.abs(decoded - theirs).max() <= 1


def _import_and_export(source: Path, tmp_path: Path, *options: str) -> tuple[str, Path]:
    checkpoint, export = tmp_path / "model.pt", tmp_path / "export"
    imported = run_cli("import", str(source), "--out", str(checkpoint), *options)
    assert imported.returncode == 0, imported.stderr
    from vqtool.export.pipeline import export_model

    export_model(checkpoint, export, log=lambda _: None)  # in this process: the CLI's export is tested elsewhere
    (report,) = [r for r in json.loads((export / "parity.json").read_text())["reports"] if r["precision"] == "fp32"]
    assert report["unexplained"] == 0 and report["identical_fraction"] >= 0.99
    return imported.stdout + imported.stderr, export


def test_a_llamagen_checkpoint_imports_with_its_own_quantizer_and_gives_its_codes(tmp_path: Path) -> None:
    model = small_llamagen()
    source = tmp_path / "vq_ds2_c2i.pt"
    # As LlamaGen's training saves it: the weights under "model", beside the optimizer and its argparse options.
    torch.save(
        {"model": model.state_dict(), "optimizer": {}, "steps": 100, "args": argparse.Namespace(lr=1e-4)}, source
    )
    refused = run_cli("import", str(source), "--out", str(tmp_path / "refused.pt"))
    one_error_line(refused, str(source), "--allow-pickle")

    said, export = _import_and_export(source, tmp_path, "--allow-pickle", "--image-size", str(SIZE))
    assert "LlamaGen VQ-2 (128 codes of 8 dimensions)" in said
    assert "quantizer: original (l2-normalised, as LlamaGen does)" in said
    _matches_the_original(export, model, llamagen, cosine=True)


def _janus_folder(model: Any, folder: Path) -> None:
    """DeepSeek's Janus layout: config.json with gen_vision_config, and the VQ model's weights under
    gen_vision_model. spread over two safetensors shards that also hold the language model's."""
    from safetensors.torch import save_file

    folder.mkdir()
    config = {
        "model_type": "multi_modality",
        "gen_vision_config": {
            "cls": "VQ-16",
            "model_type": "gen_vision",
            "params": {"image_token_size": 128, "n_embed": 8},
        },
        "language_config": {"model_type": "llama", "hidden_size": 64},
    }
    (folder / "config.json").write_text(json.dumps(config))
    vq = {f"gen_vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(vq)
    shards = {
        "model-00001-of-00002.safetensors": {"language_model.model.embed_tokens.weight": torch.randn(1000, 64)}
        | {k: vq[k] for k in names[: len(names) // 2]},
        "model-00002-of-00002.safetensors": {"language_model.lm_head.weight": torch.randn(1000, 64)}
        | {k: vq[k] for k in names[len(names) // 2 :]},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_janus_folder_imports_its_generation_vq_and_says_how_transformers_codes_differ(tmp_path: Path) -> None:
    model = small_llamagen()
    _janus_folder(model, tmp_path / "Janus-Pro")
    said, export = _import_and_export(tmp_path / "Janus-Pro", tmp_path, "--image-size", str(SIZE))
    assert "Janus's generation VQ model (128 codes of 8 dimensions) from 2 of its checkpoint files" in said
    # transformers' JanusVQVAE searches raw vectors: with these codes' lengths many of its tokens are others.
    differ = int(said.split("the library one gives ")[1].split(" of ")[0])
    assert differ > 0
    _matches_the_original(export, model, llamagen, cosine=True)


def test_a_taming_release_imports_without_running_anything_and_gives_its_remapped_codes(tmp_path: Path) -> None:
    """taming's remap: code ids are positions in the list of codebook rows in use (quantize.used, saved with the
    weights; the YAML names the .npy it was first read from, on the machine that trained it). A latent whose nearest
    row is not in use gets a random id from the original; from vqtool, the nearest row in use."""
    import vqtool
    from vqtool.errors import VqtoolError
    from vqtool.export.pipeline import export_model

    used = torch.randperm(128, generator=torch.Generator().manual_seed(2))[:96]  # 96 rows in use, shuffled
    model = taming.VQModel(TAMING_CONFIG, n_embed=128, embed_dim=8, remap=used.numpy()).eval()
    model.load_state_dict({**small_taming().state_dict(), "quantize.used": used})
    # As taming releases a run: logs/NAME/checkpoints/last.ckpt and logs/NAME/configs/model.yaml; a checkpoint of
    # another kind beside them does not make the folder ambiguous.
    source = tmp_path / "vqgan_f2"
    (source / "checkpoints").mkdir(parents=True)
    (source / "configs").mkdir()
    lightning_checkpoint(model, source / "checkpoints" / "last.ckpt", tmp_path)
    taming_yaml(source / "configs" / "model.yaml", TAMING_CONFIG, 128, 8, remap="data/vqgan_used.npy")
    torch.save({"unrelated": torch.zeros(1)}, source / "notes.pt")
    # The planted payloads bite: a full unpickle runs them.
    torch.load(source / "checkpoints" / "last.ckpt", weights_only=False)
    assert (tmp_path / PAYLOAD_FILE).exists()
    (tmp_path / PAYLOAD_FILE).unlink()

    said, export = _import_and_export(source, tmp_path, "--allow-pickle")
    assert not (tmp_path / PAYLOAD_FILE).exists()
    assert (
        "VQModel of factor 2 (128 codes of 8 dimensions, remapped to the 96 in use) from last.ckpt and model.yaml"
        in said
    )
    assert "remap: codes are positions among the 96 codebook rows in use;" in said

    images = _photos(24, seed=9)
    with torch.no_grad():
        originals = taming.codes(model, _model_input(images)).numpy()  # random ids where the nearest is not in use
        latents = model.quant_conv(model.encoder(_model_input(images))).permute(0, 2, 3, 1)
        pictures = taming.decode_codes(model, torch.from_numpy(originals))
    book = model.quantize.embedding.weight.detach()
    nearest = torch.cdist(latents.double().flatten(0, 2), book.double()).argmin(1).reshape(latents.shape[:3])
    in_use = torch.zeros(128, dtype=torch.bool)
    in_use[used] = True
    kept = in_use[nearest].numpy()
    assert 0.5 < kept.mean() < 1.0  # some latents do lie nearest a row not in use: the rule below is exercised
    with vqtool.load(export, "onnxruntime", "cpu") as tok:
        codes = tok.encode(images).astype(np.int64)
        decoded = tok.decode(originals).astype(int)
    rows_in_use = book[used]
    # Where the original's id is not drawn at random, it is vqtool's; elsewhere vqtool's is the nearest row in use.
    assert (codes[kept] == originals[kept]).mean() >= 0.99
    nearest_in_use = torch.cdist(latents.double().flatten(0, 2), rows_in_use.double()).argmin(1)
    assert (codes.reshape(-1) == nearest_in_use.numpy()).mean() >= 0.99
    assert _near_ties_only(latents, rows_in_use, codes, nearest_in_use.reshape(codes.shape).numpy())
    # Decoding ids unmaps them to their rows, as the original's get_codebook_entry does.
    theirs = ((pictures.permute(0, 2, 3, 1) + 1.0) * 127.5).clamp(0, 255).round().numpy().astype(int)
    assert np.abs(decoded - theirs).max() <= 1
    with pytest.raises(VqtoolError, match="remaps its codes .* use --latent-decode direct"):
        export_model(tmp_path / "model.pt", tmp_path / "latents", latents=True, log=lambda _: None)


def test_original_checkpoints_are_refused_in_one_line_where_they_are_not_what_they_claim(tmp_path: Path) -> None:
    model = small_taming()
    lightning_checkpoint(model, tmp_path / "last.ckpt", tmp_path)
    out = str(tmp_path / "out.pt")
    one_error_line(run_cli("import", str(tmp_path / "last.ckpt"), "--out", out, "--allow-pickle"), "no YAML beside it")
    taming_yaml(tmp_path / "last.yaml", TAMING_CONFIG, 128, 8, remap="used.npy")  # and no quantize.used kept
    one_error_line(
        run_cli("import", str(tmp_path / "last.ckpt"), "--out", out, "--allow-pickle"), "remap", "no quantize.used"
    )
    taming_yaml(tmp_path / "last.yaml", {**TAMING_CONFIG, "ch_mult": [1, 2, 2]}, 128, 8)
    one_error_line(
        run_cli("import", str(tmp_path / "last.ckpt"), "--out", out, "--allow-pickle"), "lacks weight", "taming"
    )
    # A checkpoint that names a function of os is refused before anything is unpickled.
    torch.save({"state_dict": model.state_dict(), "hook": _OsSystem()}, tmp_path / "evil.ckpt")
    (tmp_path / "evil.yaml").write_text((tmp_path / "last.yaml").read_text())
    one_error_line(run_cli("import", str(tmp_path / "evil.ckpt"), "--out", out, "--allow-pickle"), "names posix.system")
    assert not (tmp_path / PAYLOAD_FILE).exists()
    assert not Path(out).exists()


class _OsSystem:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {PAYLOAD_FILE}",))


def test_reading_a_lightning_checkpoint_maps_what_it_leaves_out(tmp_path: Path) -> None:
    """The optimizer's states and the discriminator are three times the model: reading keeps the model's tensors
    and takes no more memory than twice them."""
    from tests.conftest import in_subprocess

    torch.manual_seed(0)
    ddconfig = {**TAMING_CONFIG, "ch": 64, "ch_mult": [1, 2, 4], "resolution": 64, "attn_resolutions": [16]}
    model = taming.VQModel(ddconfig, n_embed=1024, embed_dim=8)
    state = model.state_dict()
    kept = sum(v.numel() * v.element_size() for v in state.values())
    big = {
        "state_dict": {**state, **{f"loss.discriminator.{k}": v.clone() for k, v in state.items()}},
        "optimizer_states": [
            {"state": {i: {"exp_avg": v.clone(), "exp_avg_sq": v.clone()} for i, v in enumerate(state.values())}}
        ],
    }
    torch.save(big, tmp_path / "last.ckpt")
    taming_yaml(tmp_path / "model.yaml", ddconfig, 1024, 8)
    assert (tmp_path / "last.ckpt").stat().st_size > 3.5 * kept
    # VmHWM, the process's own peak: getrusage's ru_maxrss also counts the parent's peak at fork.
    measured = in_subprocess(
        f"""
import json
from pathlib import Path
from vqtool.model.originals import read_original
def kib(field):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field + ':'))
before = kib('VmRSS')
original = read_original(Path({str(tmp_path / "last.ckpt")!r}), 'taming', config_file=None, image_size=None,
                         allow_pickle=True)
total = sum(float(v.sum()) for v in original.state.values())  # every kept tensor read
kept = sum(v.numel() * v.element_size() for v in original.state.values())
print(json.dumps({{"grew": (kib('VmHWM') - before) * 1024, "kept": kept}}))
"""
    )
    assert isinstance(measured, dict)
    assert measured["kept"] == kept
    assert measured["grew"] <= 2 * kept, measured
