"""Original checkpoints at their published sizes: codes and decodes of vqtool's export against the original code.

    python -m benchmarks.originals [--models llamagen-vq16,llamagen-vq8,janus-pro,taming-f16,ldm-vq-f4] [--work DIR]

Builds each model from the independent port of its original code (tests/reference/: LlamaGen's vq_model.py, which
Janus carries unchanged, and taming-transformers' VQGAN, which latent diffusion's VQ-f4 runs), at its published
configuration with seeded weights and a codebook drawn from its latents of the embedded photographs, each row then
given a length of its own (trained codebooks are not of unit length). Saves it in the original's file format (a
LlamaGen .pt, a Janus folder of safetensors shards, a Lightning .ckpt with its YAML), runs `vqtool import` and
`vqtool export` (FP32), and compares the export's codes of the embedded photographs at the model's size with the
original code's (the goal: identical, near-ties counted apart) and its decode of the original's codes with the
original's decode (PSNR). For Janus it also prints how many of transformers' tokens differ from the original's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reference import llamagen, taming  # noqa: E402
from tests.test_import import near_ties  # noqa: E402
from tests.test_originals import _janus_folder, lightning_checkpoint, taming_yaml  # noqa: E402
from vqtool.images.embedded import embedded_photographs  # noqa: E402
from vqtool.images.quality import psnr  # noqa: E402

PARITY_IMAGES = 8
MODELS = {
    "llamagen-vq16": ("llamagen", 256),
    "llamagen-vq8": ("llamagen", 256),
    "janus-pro": ("janus", 384),
    "taming-f16": ("taming", 256),
    "ldm-vq-f4": ("taming", 256),
}


def _input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _batched(function: Any, x: torch.Tensor, size: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([function(x[i : i + size]) for i in range(0, len(x), size)])


def _seed_codebook(model: Any, images: np.ndarray) -> None:
    latents = _batched(lambda x: model.quant_conv(model.encoder(x)), _input(images))
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    generator = torch.Generator().manual_seed(1)
    book = model.quantize.embedding.weight
    picks = torch.randint(len(flat), (book.shape[0],), generator=generator)
    noise = 0.1 * flat.std() * torch.randn(book.shape, generator=generator)
    rows = flat[picks] + noise
    lengths = 0.5 + 1.5 * torch.rand(book.shape[0], 1, generator=generator)
    with torch.no_grad():
        book.copy_(rows / rows.norm(dim=-1, keepdim=True) * lengths * flat.norm(dim=-1).mean())


def build(name: str, folder: Path, images: np.ndarray) -> tuple[Any, Any, Path, list[str]]:
    """(model, its reference module, the SOURCE to import, import options)."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if name.startswith("llamagen") or name == "janus-pro":
        model = (llamagen.VQ_8 if name == "llamagen-vq8" else llamagen.VQ_16)().eval()
        _seed_codebook(model, images)
        if name == "janus-pro":
            _janus_folder(model, folder / "Janus-Pro-7B")
            return model, llamagen, folder / "Janus-Pro-7B", []
        source = folder / f"vq_ds{8 if name.endswith('8') else 16}_c2i.pt"
        state = {"model": model.state_dict(), "optimizer": {}, "args": argparse.Namespace(image_size=256)}
        torch.save(state, source)
        return model, llamagen, source, ["--allow-pickle"]
    published = taming.PUBLISHED["taming_vqgan_imagenet_f16_16384" if name == "taming-f16" else "ldm_vq_f4"]
    model = taming.VQModel(published["ddconfig"], published["n_embed"], published["embed_dim"]).eval()
    _seed_codebook(model, images)
    lightning_checkpoint(model, folder / "last.ckpt", folder)
    taming_yaml(folder / "model.yaml", published["ddconfig"], published["n_embed"], published["embed_dim"])
    return model, taming, folder / "last.ckpt", ["--allow-pickle"]


def _vqtool(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "vqtool", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"vqtool {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout + result.stderr


def measure(name: str, work: Path) -> dict[str, Any]:
    import vqtool

    kind, size = MODELS[name]
    images = embedded_photographs(size)
    model, reference, source, options = build(name, work / name, images)
    checkpoint, export = work / name / "imported.pt", work / name / "export"
    started = time.perf_counter()
    said = _vqtool("import", str(source), "--out", str(checkpoint), "--overwrite", *options)
    imported = time.perf_counter() - started
    # Export's own parity on 8 of the photographs (it measures batch invariance too, at a cost); the comparison
    # with the original below runs on all of them.
    parity = work / name / "parity-images"
    parity.mkdir(exist_ok=True)
    for index, image in enumerate(images[:PARITY_IMAGES]):
        Image.fromarray(image).save(parity / f"{index}.png")
    _vqtool("export", str(checkpoint), "--out", str(export), "--overwrite", "--images", str(parity))
    x = _input(images)
    expected = _batched(lambda b: reference.codes(model, b), x).numpy()
    # The original code run one image at a time: PyTorch's CPU convolutions round differently at batch 1 and at
    # batch 4, so its own codes can differ between the two on a few latents.
    expected_alone = _batched(lambda b: reference.codes(model, b), x, size=1).numpy()
    latents = _batched(lambda b: model.quant_conv(model.encoder(b)), x).permute(0, 2, 3, 1)
    pictures = _batched(lambda c: reference.decode_codes(model, c), torch.from_numpy(expected))
    theirs = ((pictures.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    with vqtool.load(export, "onnxruntime", "cpu") as tok:
        codes = tok.encode(images).astype(np.int64)
        decoded = tok.decode(expected)
    parity = json.loads((export / "parity.json").read_text())["reports"][0]
    book = model.quantize.embedding.weight.detach()
    if kind != "taming":  # LlamaGen's and Janus's search: l2-normalised latents and codes
        latents, book = torch.nn.functional.normalize(latents, dim=-1), torch.nn.functional.normalize(book, dim=-1)
    ties = int(near_ties(latents, book, codes, expected).sum())
    row = {
        "model": name,
        "format": kind,
        "size": size,
        "codes": int(codes.size),
        "identical": float((codes == expected).mean()),
        "differ": int((codes != expected).sum()),
        "near_ties": ties,
        "differ_from_alone": int((codes != expected_alone).sum()),
        "near_ties_from_alone": int(near_ties(latents, book, codes, expected_alone).sum()),
        "original_alone_vs_batched": int((expected_alone != expected).sum()),
        "original_alone_vs_batched_near_ties": int(near_ties(latents, book, expected_alone, expected).sum()),
        "parity_unexplained": parity["unexplained"],
        "decode_psnr_db": float(psnr(decoded, theirs)),
        "decode_max_grey_levels": int(np.abs(decoded.astype(int) - theirs.astype(int)).max()),
        "import_s": round(imported, 1),
    }
    if "the library one gives" in said:
        row["transformers_differ"] = said.split("the library one gives ")[1].split(" codes")[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/vqtool-originals"))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args.work))
        print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| model | format | size | codes identical to the original's (batches of 4) | to the original's one image "
        "at a time | the original's own: one at a time against batches of 4 | decode of the original's codes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['format']} | {r['size']} | {r['identical']:.3%} ({r['differ']} of {r['codes']} "
            f"differ, {r['near_ties']} of them near-ties) | {r['differ_from_alone']} differ, "
            f"{r['near_ties_from_alone']} near-ties | {r['original_alone_vs_batched']} differ, "
            f"{r['original_alone_vs_batched_near_ties']} near-ties | {r['decode_psnr_db']:.1f} dB, at most "
            f"{r['decode_max_grey_levels']} grey levels |"
        )


if __name__ == "__main__":
    main()
