"""Imported tokenizers at their published configurations: parity, speed against the library's own eager code,
and memory, on the embedded photographs.

    python -m benchmarks.imported [--models ldm-vq-f4,ldm-vq-f8,kandinsky-movq,amused-256,janus-pro-vq16]
        [--checkpoints NAME=PATH,...] [--work DIR] [--parity-images 8] [--rounds 3] [--int8] [--memory 50,200]

No weights can be downloaded here, so each model is built with its library's own class from the values of its
published config.json (PUBLISHED, with their sources), seeded, its codebook drawn from latents of the embedded
photographs (so that codes spread over the images as a trained model's do), and saved with save_pretrained. Then:
  parity  `vqtool import`, `vqtool export --fp16 --bf16` (ONNX Runtime FP32 and FP16, OpenVINO BF16 and PyTorch
          BF16 under autocast against the library, on --parity-images of the embedded photographs, each published
          under the contract it meets; --bf16 only where some runtime runs BF16 here),
          and `vqtool parity --backend openvino --precision fp32`; vqtool checkpoints (--checkpoints) are
          compared on their own held-out data;
  speed   batch 4 at the native resolution, ONNX Runtime FP32 and each opt-in precision against the library's
          eager encode (VQModel.encode + quantize, JanusVQVAE.encode) and decode from codes, and against that
          eager code under BF16 autocast (what users run for speed today), in alternating rounds; the goals:
          FP32 encode >= 1.3x and decode >= 1.2x eager, the best opt-in encode >= 2x.
          Each encode's arithmetic rate (the encoder's FLOP per image x images/s) is printed beside this CPU's
          FP32 matrix-product rate, measured after the rounds: an FP32 runtime near that rate is as fast as
          FP32 can be, so its ratio to eager is bounded by how far eager falls below it;
  memory  peak RSS of `vqtool encode` of --memory photographs at the native size (the first model only); the
          goal: under 1.5 GB for VQ-f4 at 200 and at 50 images.
Figures go to WORK/imported.json; the drift table (Choosing a precision) is printed at the end. Each model takes
minutes on two cores: choose a few with --models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.run import peak_rss_mib

REPO = Path(__file__).resolve().parents[1]
BATCH = 4
GOALS = {"encode": 1.3, "decode": 1.2, "best_encode": 2.0, "memory_mib": 1536}

_LDM_DOWN = "DownEncoderBlock2D"
_LDM_UP = "UpDecoderBlock2D"
# Latent diffusion's VQ-f8 layout (its source is under "ldm-vq-f8" below), which Kandinsky's MoVQ shares.
_LDM_VQ_F8: dict[str, Any] = {
    "down_block_types": (_LDM_DOWN,) * 3 + ("AttnDownEncoderBlock2D",),
    "up_block_types": ("AttnUpDecoderBlock2D",) + (_LDM_UP,) * 3,
    "block_out_channels": (128, 256, 256, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "vq_embed_dim": 4,
    "num_vq_embeddings": 16384,
    "norm_num_groups": 32,
    "sample_size": 256,
}
# The published config.json values, as the libraries' classes take them.
PUBLISHED: dict[str, dict[str, Any]] = {
    # CompVis/latent-diffusion models/first_stage_models/vq-f4/*.yaml: embed_dim 3, n_embed 8192, ch 128,
    # ch_mult [1, 2, 4], num_res_blocks 2, z_channels 3, no attention but the mid-block's; trained at 256 x 256.
    "ldm-vq-f4": {
        "library": "diffusers",
        "class": "VQModel",
        "image_size": 256,
        "kwargs": {
            "down_block_types": (_LDM_DOWN,) * 3,
            "up_block_types": (_LDM_UP,) * 3,
            "block_out_channels": (128, 256, 512),
            "layers_per_block": 2,
            "latent_channels": 3,
            "vq_embed_dim": 3,
            "num_vq_embeddings": 8192,
            "norm_num_groups": 32,
            "sample_size": 256,
        },
    },
    # CompVis/latent-diffusion models/first_stage_models/vq-f8/config.yaml: embed_dim 4, n_embed 16384, ch 128,
    # ch_mult [1, 2, 2, 4], num_res_blocks 2, attn_resolutions [32] (the last encoder level, the first decoder
    # one, at 256 x 256), z_channels 4.
    "ldm-vq-f8": {
        "library": "diffusers",
        "class": "VQModel",
        "image_size": 256,
        "kwargs": _LDM_VQ_F8,
    },
    # kandinsky-community/kandinsky-2-2-decoder movq/config.json: the VQ-f8 layout with spatial norm in the
    # decoder (conditioned on the codes), 16384 codes of 4 dims; MoVQ was trained on 256 x 256 crops.
    "kandinsky-movq": {
        "library": "diffusers",
        "class": "VQModel",
        "image_size": 256,
        "kwargs": {**_LDM_VQ_F8, "norm_type": "spatial", "sample_size": 32},
    },
    # amused/amused-256 vqvae/config.json (diffusers scripts/convert_amused.py, make_vqvae): five levels,
    # 128-256-256-512-768 channels, 8192 codes of 64 dims, no mid-block attention, lookup_from_codebook.
    "amused-256": {
        "library": "diffusers",
        "class": "VQModel",
        "image_size": 256,
        "kwargs": {
            "down_block_types": (_LDM_DOWN,) * 5,
            "up_block_types": (_LDM_UP,) * 5,
            "block_out_channels": (128, 256, 256, 512, 768),
            "layers_per_block": 2,
            "latent_channels": 64,
            "num_vq_embeddings": 8192,
            "norm_num_groups": 32,
            "mid_block_add_attention": False,
            "lookup_from_codebook": True,
            "sample_size": 32,
        },
    },
    # deepseek-community/Janus-Pro-1B config.json vq_config (LlamaGen VQ-16): 16384 codes of 8 dims, base 128,
    # channel_multiplier [1, 1, 2, 2, 4], num_res_blocks 2, latent 256, 24 x 24 patches of 384 x 384 images;
    # its image processor scales pixels to [-1, 1].
    "janus-pro-vq16": {
        "library": "transformers",
        "class": "JanusVQVAE",
        "image_size": 384,
        "kwargs": {
            "embed_dim": 8,
            "num_embeddings": 16384,
            "base_channels": 128,
            "channel_multiplier": [1, 1, 2, 2, 4],
            "num_res_blocks": 2,
            "latent_channels": 256,
            "num_patches": 24,
        },
        "processor": {"rescale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    },
}


def _vqtool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "vqtool", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout + result.stderr, file=sys.stderr)
    return result


def _library_model(spec: dict[str, Any]) -> Any:
    from vqtool.model.imported import LIBRARIES

    torch.manual_seed(0)
    return LIBRARIES[spec["library"]].build(spec["class"], spec["kwargs"]).eval()


def build(name: str, spec: dict[str, Any], folder: Path) -> None:
    """The published configuration, seeded, its codebook set from latents of the embedded photographs, saved
    with the library's save_pretrained (and its image processor's settings beside it)."""
    if (folder / "config.json").is_file():
        return
    from vqtool.images.embedded import embedded_photographs
    from vqtool.model.imported import FAMILIES, ImportedConfig, pixel_scaling

    model = _library_model(spec)
    family = FAMILIES[(spec["library"], spec["class"])]
    gain, bias = pixel_scaling(**spec["processor"]) if "processor" in spec else family.scaling
    draft = ImportedConfig(spec["library"], spec["class"], "", {}, spec["image_size"], 1, 0, "library", gain, bias)
    wrapper = family(draft, model)
    photos = torch.from_numpy(embedded_photographs(spec["image_size"]))
    with torch.no_grad():
        latents = torch.cat(
            [wrapper.encoder_body()(wrapper.model_input(photos[s : s + 2])) for s in range(0, len(photos), 2)]
        )
    book = wrapper.embedding()
    with torch.no_grad():
        book.copy_(_trained_like_codebook(latents.reshape(-1, latents.shape[-1]), len(book)))
    model.save_pretrained(folder)
    if "processor" in spec:
        mean, std = spec["processor"]["mean"], spec["processor"]["std"]
        processor = {"rescale_factor": spec["processor"]["rescale"], "image_mean": mean, "image_std": std}
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    print(f"{name}: built {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", flush=True)


def _trained_like_codebook(latents: torch.Tensor, count: int) -> torch.Tensor:
    """A codebook spread as training spreads one: k-means centres of the photographs' latents (at most one per
    four latents, so that no two centres split one cluster), the other codes drawn from a normal fit to the
    latents, the rarely used codes a trained codebook also holds. Picking latents themselves instead leaves
    near-duplicate codes, whose near-ties no trained model has."""
    from vqtool.train.codebook import kmeans

    generator = torch.Generator().manual_seed(1)
    fitted = min(count, len(latents) // 4)
    centres = kmeans(latents, fitted, generator)
    spread = latents.mean(0) + latents.std(0) * torch.randn(count - fitted, latents.shape[1], generator=generator)
    return torch.cat([centres, spread])


def _photo_folder(folder: Path, size: int, count: int) -> Path:
    """`count` PNG files of the embedded photographs at `size` (repeated, mirrored, where there are fewer)."""
    from vqtool.images.embedded import embedded_photographs

    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    photos = embedded_photographs(size)
    for index in range(count):
        pixels = photos[index % len(photos)]
        Image.fromarray(pixels if (index // len(photos)) % 2 == 0 else pixels[:, ::-1]).save(
            folder / f"{index:04d}.png"
        )
    return folder


def _bf16_runs_here() -> bool:
    """Whether some runtime runs BF16 on this machine; where none does, `export --bf16` is refused, so not asked."""
    from vqtool.errors import VqtoolError
    from vqtool.export.pipeline import refuse_bf16_that_nothing_runs

    try:
        refuse_bf16_that_nothing_runs()
    except VqtoolError as exc:
        print(f"BF16 not checked: {exc}", flush=True)
        return False
    return True


def parity(name: str, work: Path, spec: dict[str, Any], images: int, int8: bool) -> dict[str, Any]:
    """Export (FP32, FP16, OpenVINO BF16, INT8 if asked) with parity on `images` photographs, and OpenVINO FP32's
    parity. A vqtool checkpoint (spec "checkpoint") is compared on its own held-out data instead."""
    checkpoint, export = Path(spec.get("checkpoint", work / f"{name}.pt")), work / f"{name}-export"
    photos = work / f"parity-{spec['image_size']}-{images}"
    if not (export / "manifest.json").is_file():
        options = ["--fp16", *(["--bf16"] if _bf16_runs_here() else []), *(["--int8"] if int8 else [])]
        if "checkpoint" not in spec:
            imported = _vqtool(
                "import", str(work / name), "--out", str(checkpoint), "--image-size", str(spec["image_size"]),
                "--overwrite",
            )  # fmt: skip
            print(imported.stdout.strip(), flush=True)
            options += ["--images", str(_photo_folder(photos, spec["image_size"], images))]
        started = time.perf_counter()
        exported = _vqtool("export", str(checkpoint), "--out", str(export), *options)
        print(
            f"{name}: export {'passed' if exported.returncode == 0 else 'FAILED'} parity in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        for line in (exported.stdout + exported.stderr).splitlines():
            if line.startswith(("calibrating INT8", "INT8 encoder")):  # what the INT8 search settled on
                print(f"{name}: {line}", flush=True)
        if exported.returncode != 0:
            export = export.with_name(f"{export.name}.failed-parity")
    on_photos = [] if "checkpoint" in spec else ["--images", str(photos)]
    _vqtool("parity", str(export), "--backend", "openvino", "--precision", "fp32", *on_photos)
    record = json.loads((export / "parity.json").read_text())
    return {"export": str(export), "reports": record["reports"]}


def _eager_calls(export: Path) -> tuple[Callable[[torch.Tensor], Any], Callable[[torch.Tensor], Any], Any]:
    """The library's own encode (images at model scale -> codes) and decode (codes -> images), and the model."""
    from vqtool.model.checkpoint import load_checkpoint

    model = load_checkpoint(export / "model.pt").model
    return getattr(model, "library_encode", model.encode), model.decode, model


def _autocast(call: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """What a user does today for speed: the library's eager code under BF16 autocast, nothing recorded."""

    def under_autocast(x: torch.Tensor) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call(x)

    return under_autocast


def speed(name: str, export: Path, rounds: int) -> list[dict[str, Any]]:
    """Images/s of each contender at batch 4, timed in alternating rounds, and its median per-round ratio to the
    library's eager code."""
    import vqtool
    from vqtool.images.embedded import embedded_photographs

    encode_eager, decode_eager, model = _eager_calls(export)
    images = embedded_photographs(model.config.image_size)[:BATCH]
    with torch.no_grad():
        x = model.model_input(torch.from_numpy(images))
        codes = model.encode(x)
    manifest = json.loads((export / "manifest.json").read_text())
    contenders: dict[str, list[tuple[str, Callable[[], Any]]]] = {"encode": [], "decode": []}
    contenders["encode"].append(("library eager", lambda: encode_eager(x)))
    contenders["decode"].append(("library eager", lambda: decode_eager(codes)))
    encode_autocast, decode_autocast = _autocast(encode_eager), _autocast(decode_eager)
    with torch.no_grad():
        rounded = torch.as_tensor(encode_autocast(x)).reshape(len(x), -1)
        autocast_identical = float((rounded == torch.as_tensor(encode_eager(x)).reshape(len(x), -1)).float().mean())
    print(f"{name}: library eager under BF16 autocast keeps {autocast_identical:.2%} of codes", flush=True)
    contenders["encode"].append(("library autocast bf16", lambda: encode_autocast(x)))
    contenders["decode"].append(("library autocast bf16", lambda: decode_autocast(codes)))
    opened = []
    for backend, precision in (
        ("onnxruntime", "fp32"),
        ("onnxruntime", "fp16"),
        ("onnxruntime", "int8"),
        ("openvino", "fp32"),
        ("openvino", "bf16"),
        ("torch", "bf16"),
    ):
        graph = "encoder" if precision in ("fp32", "bf16") else f"encoder.{precision}"
        if graph not in manifest["graphs"]:
            continue
        try:
            tok = vqtool.load(export, backend, "cpu", precision)
        except vqtool.VqtoolError as exc:
            print(f"{name}: {backend} {precision} not timed: {exc}", flush=True)
            continue
        opened.append(tok)
        label = f"{backend} {precision}"
        contenders["encode"].append((label, lambda t=tok: t.encode(images)))
        if tok.has_decoder and precision != "int8":
            contenders["decode"].append((label, lambda t=tok: t.decode(codes.numpy())))
    rows = []
    timed: dict[str, list[list[float]]] = {}
    for stage, calls in contenders.items():
        if stage == "decode" and not model.has_decoder:
            continue
        timed[stage] = _alternating([call for _, call in calls], rounds)
    # After the rounds, so that the contenders are timed first and alike; the best of short rounds (a shared
    # machine only ever makes it look slower).
    from vqtool.bench.model_only import fp32_matmul_flops
    from vqtool.model.vqvae import encoder_macs

    matmul_rate, flop_per_image = fp32_matmul_flops(2.0), 2.0 * encoder_macs(model)
    for stage, seconds in timed.items():
        calls = contenders[stage]
        for (label, _), per_round in zip(calls, seconds, strict=True):
            ratio = float(np.median(np.divide(seconds[0], per_round)))
            images_per_s = BATCH / float(np.median(per_round))
            row = {"model": name, "stage": stage, "runtime": label, "images_per_s": images_per_s, "vs_eager": ratio}
            if label == "library autocast bf16" and stage == "encode":
                row["identical"] = autocast_identical
            rate = ""
            if stage == "encode":
                row["gflop_per_s"] = images_per_s * flop_per_image / 1e9
                row["of_fp32_matmul_rate"] = images_per_s * flop_per_image / matmul_rate
                rate = f", {row['gflop_per_s']:.0f} GFLOP/s ({row['of_fp32_matmul_rate']:.0%} of FP32 matmul)"
            rows.append(row)
            print(f"{name} {stage} {label}: {images_per_s:.2f} images/s, {ratio:.2f}x eager{rate}", flush=True)
    print(
        f"{name}: the encoder does {flop_per_image / 1e9:.1f} GFLOP per image; a 1024x1024 FP32 matrix product runs "
        f"at {matmul_rate / 1e9:.0f} GFLOP/s here",
        flush=True,
    )
    for tok in opened:
        tok.close()
    return rows


def _alternating(calls: list[Callable[[], Any]], rounds: int) -> list[list[float]]:
    """Seconds per call of each contender, one call each per round, in turn: every contender sees the same drift."""
    for call in calls:
        call()  # warm-up: first-run allocations and graph optimisation
    seconds: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for _ in range(rounds):
            for index, call in enumerate(calls):
                started = time.perf_counter()
                call()
                seconds[index].append(time.perf_counter() - started)
    return seconds


def memory(export: Path, work: Path, size: int, counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for count in counts:
        folder = _photo_folder(work / f"memory-{size}-{count}", size, count)
        out = work / f"memory-{count}.npy"
        out.unlink(missing_ok=True)
        rss, seconds = peak_rss_mib("encode", str(folder), "--model", str(export), "--out", str(out))
        rows.append({"images": count, "peak_rss_mib": rss, "seconds": seconds})
        print(f"encode {count} images of {size}x{size}: peak RSS {rss:,.0f} MiB, {seconds:.0f} s", flush=True)
    return rows


def plot_parity(figures: dict[str, Any], path: Path) -> None:
    """Identical codes per model and runtime, the parity rule's line, and each runtime's unexplained mismatches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(figures["models"])
    labels = sorted(
        {f"{r['runtime']} {r['precision']}" for m in models for r in figures["models"][m]["reports"]},
        key=lambda label: (label.split()[1] != "fp32", label),
    )
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(models), 3.6))
    width = 0.8 / max(1, len(labels))
    for index, label in enumerate(labels):
        shares, notes = [], []
        for model in models:
            found = [r for r in figures["models"][model]["reports"] if f"{r['runtime']} {r['precision']}" == label]
            shares.append(100 * found[0]["identical"] / found[0]["codes"] if found else np.nan)
            notes.append(found[0]["unexplained"] if found else 0)
        offsets = np.arange(len(models)) + (index - (len(labels) - 1) / 2) * width
        bars = ax.bar(offsets, shares, width, label=label)
        for bar, unexplained in zip(bars, notes, strict=True):
            if unexplained:
                ax.annotate(f"{unexplained}", (bar.get_x() + width / 2, bar.get_height()), ha="center", fontsize=7)
    ax.axhline(99.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(np.arange(len(models)), models, fontsize=8)
    ax.set_ylim(98.5, 100.1)
    ax.set_ylabel("codes identical to the library's (%)")
    ax.set_title(
        "Parity of the exported graphs (numbers: unexplained mismatches; dashed: the FP16/BF16 rule)", fontsize=8
    )
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def drift_table(figures: dict[str, Any]) -> str:
    """The drift table of the docs (Choosing a precision), in Markdown: per model, runtime and precision, the codes
    identical to the exact ones, batch invariance, the changed codes' regret and rank, their decode against the
    exact codes', the contract met, and the encode's speed against the library's eager code."""
    lines = [
        "| model | runtime | identical | batch-invariant | regret p99 / max | rank max | drift PSNR | contract "
        "| encode × eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, result in figures["models"].items():
        speeds = {r["runtime"]: r for r in result.get("speed", []) if r["stage"] == "encode"}
        for r in result["reports"]:
            label = f"{r['runtime']} {r['precision']}"
            changed = r["identical"] < r["codes"]
            speed = speeds.get(label)
            lines.append(
                f"| {model} | {label} | {r['identical'] / r['codes']:.2%} | {r.get('batch_identical', 1.0):.2%} | "
                + (f"{r['regret_p99']:.3g} / {r['regret_max']:.3g} | {r['rank_max']} | " if changed else "— | — | ")
                + ("—" if r.get("drift_psnr") is None else f"{r['drift_psnr']:.1f} dB")
                + f" | {r.get('contract') or '—'} | "
                + ("—" if speed is None else f"{speed['vs_eager']:.2f}×")
                + " |"
            )
        autocast = speeds.get("library autocast bf16")
        if autocast is not None:
            lines.append(
                f"| {model} | library eager, BF16 autocast | {autocast['identical']:.2%} | — | — | — | — | "
                f"not recorded | {autocast['vs_eager']:.2f}× |"
            )
    return "\n".join(lines)


def _own_checkpoints(listed: str) -> dict[str, dict[str, Any]]:
    """NAME=PATH pairs of vqtool checkpoints, as specs the steps take."""
    from vqtool.model.checkpoint import load_checkpoint

    specs = {}
    for pair in filter(None, listed.split(",")):
        name, path = pair.split("=", 1)
        specs[name] = {"checkpoint": path, "image_size": load_checkpoint(Path(path)).model_config.image_size}
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(m for m in PUBLISHED if PUBLISHED[m].get("default", True)))
    parser.add_argument("--work", type=Path, default=Path("/tmp/vqtool-imported"))
    parser.add_argument("--parity-images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="export and time INT8 encoders too (slow to calibrate)")
    parser.add_argument(
        "--checkpoints", default="", help="NAME=PATH,...: vqtool checkpoints (the presets) to measure beside them"
    )
    parser.add_argument("--memory", default="50,200", help="photograph counts for the peak-RSS figures")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--figure", type=Path, help="also draw the parity figure (identical codes per runtime) here")
    parser.add_argument("--plot-only", action="store_true", help="draw --figure from WORK/imported.json and stop")
    args = parser.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        plot_parity(json.loads((args.work / "imported.json").read_text()), args.figure)
        return
    specs = {**PUBLISHED, **_own_checkpoints(args.checkpoints)}
    names = [n for n in args.models.split(",") if n] + [n for n in specs if n not in PUBLISHED]
    record = args.work / "imported.json"
    # Models measured by an earlier run in the same WORK stay in the record; this run's replace theirs.
    figures: dict[str, Any] = json.loads(record.read_text()) if record.is_file() else {"models": {}}
    from vqtool.host import cpu_description

    figures["machine"] = f"{cpu_description()}, {len(os.sched_getaffinity(0))} cores"
    for index, name in enumerate(names):
        spec = specs[name]
        if "checkpoint" not in spec:
            build(name, spec, args.work / name)
        result = parity(name, args.work, spec, args.parity_images, args.int8)
        export = Path(result["export"])
        if not args.skip_speed:
            result["speed"] = speed(name, export, args.rounds)
        if index == 0 and args.memory:
            counts = [int(c) for c in args.memory.split(",")]
            result["memory"] = memory(export, args.work, spec["image_size"], counts)
        figures["models"].setdefault(name, {}).update(result)
        (args.work / "imported.json").write_text(json.dumps(figures, indent=1))
    if args.figure:
        plot_parity(figures, args.figure)
    print(drift_table(figures))
    print(f"\nfigures: {args.work / 'imported.json'}")


if __name__ == "__main__":
    main()
