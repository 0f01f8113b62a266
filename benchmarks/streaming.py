"""Training from collections read while training runs: memory, speed and start-up (issue 11's goals).

    python -m benchmarks.streaming [--work DIR] [--large 200000] [--small 10000] [--rounds 3]

Makes (once, reused afterwards) folders of 32x32 PNGs, the same images as WebDataset tar shards and as a
.npy, at two sizes (random crops of the embedded photographs), and prints:

- memory: peak RSS of `vqtool train --steps 100` on each source at both sizes (goal: the large one at most
  100 MB above the small one, the file names counted apart);
- speed: training steps/s of the default model from the PNG folder against the same images held in memory,
  timed in alternating rounds in one process (goal: >= 90%); and at 128x128 from JPEGs, the loader's
  images/s alone against the training step's;
- start-up: seconds from opening the large folder to the first batch in hand (goal: < 5 s).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARD_SAMPLES = 1000
BATCH = 128


def _crops(count: int, size: int, seed: int) -> np.ndarray:
    from vqtool.train.data.memory import default_training_set

    return default_training_set(size).batch(0, count, seed=seed)


def _photo_crops(count: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    """Crops of the embedded photographs at their own resolution (the default data is downscaled to 256)."""

    from vqtool.images.embedded import EMBEDDED_PHOTOS, read_embedded_photo

    photos = [read_embedded_photo(name, 10**6) for name in EMBEDDED_PHOTOS]
    photos = [p for p in photos if p.shape[0] >= height and p.shape[1] >= width]
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        top, left = int(rng.integers(photo.shape[0] - height + 1)), int(rng.integers(photo.shape[1] - width + 1))
        crops.append(photo[top : top + height, left : left + width])
    return crops


def make_png_folder(folder: Path, count: int) -> Path:
    from vqtool.images.writing import write_pngs

    if (folder / "done").exists():
        return folder
    for start in range(0, count, 10_000):
        part = folder / f"part{start // 10_000:03d}"
        part.mkdir(parents=True, exist_ok=True)
        images = _crops(min(10_000, count - start), 32, seed=start)
        write_pngs(part, [f"{start + i:07d}.png" for i in range(len(images))], images)
    (folder / "done").touch()
    return folder


def make_shards(folder: Path, count: int) -> Path:
    from vqtool.images.writing import png_bytes

    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, count, SHARD_SAMPLES)):
        images = _crops(min(SHARD_SAMPLES, count - start), 32, seed=start)
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w") as tar:
            for index, pixels in enumerate(images):
                data = png_bytes(pixels)
                info = tarfile.TarInfo(f"{start + index:07d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "done").touch()
    return folder


def make_npy(path: Path, count: int) -> Path:
    if not path.exists():
        array = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), "w+", np.uint8, (count, 32, 32, 3))
        for start in range(0, count, 10_000):
            array[start : start + 10_000] = _crops(min(10_000, count - start), 32, seed=start)
        array.flush()
        del array
        path.with_suffix(".tmp.npy").rename(path)
    return path


def peak_rss_mib(data: Path, out: Path) -> float:
    """Peak RSS of `vqtool train --steps 100` (the largest of its processes), in a fresh measuring process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "vqtool", "train", "--data", str(data), "--steps", "100", "--out", str(out)]
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *command], cwd=REPO, check=True, capture_output=True, text=True)
    return int(done.stdout.strip()) / 1024


def names_mib(folder: Path) -> float:
    from vqtool.images.reading import list_image_names

    names = list_image_names([folder])
    return (sys.getsizeof(names) + sum(sys.getsizeof(n) for n in names)) / 2**20


def start_up_seconds(folder: Path) -> float:
    """From opening the folder (listing, split, validation reads) to the first training batch in hand."""
    from vqtool.train.data.memory import Share
    from vqtool.train.data.streaming import default_workers, load_training_set

    started = time.perf_counter()
    data = load_training_set(folder, 32, log=lambda _: None)
    next(data.stream(0, BATCH, 0, Share(workers=default_workers())))
    return time.perf_counter() - started


def training_rates(folder: Path, rounds: int, steps: int, workers: int) -> tuple[list[float], list[float]]:
    """Steps/s of the default model from the folder and from the same images in memory, in alternating rounds."""
    import torch

    from vqtool.model.config import ModelConfig
    from vqtool.model.vqvae import VQVAE, images_to_input
    from vqtool.train.data.memory import Share, TrainingSet
    from vqtool.train.data.streaming import IndexedSet, load_training_set, read_image

    streamed = load_training_set(folder, 32, log=lambda _: None)
    assert isinstance(streamed, IndexedSet)
    # The same training images, read once into an array: what `--data` did before it streamed.
    held = np.stack([read_image(streamed.images, int(i), streamed.max_pixels) for i in streamed.train])
    in_memory = TrainingSet(held, streamed.val, 32, len(held))
    torch.manual_seed(0)
    model = VQVAE(ModelConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def rate(data: object, start: int) -> float:
        batches = data.stream(start, BATCH, 0, Share(workers=workers))  # type: ignore[attr-defined]
        next(batches)  # readers started and warm
        began = time.perf_counter()
        for _ in range(steps):
            result = model(images_to_input(torch.from_numpy(next(batches).images)))
            loss = result.recon_loss + result.codebook_loss + 0.25 * result.commit_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return steps / (time.perf_counter() - began)

    folder_rates, memory_rates = [], []
    for index in range(rounds):
        folder_rates.append(rate(streamed, index * 1000))
        memory_rates.append(rate(in_memory, index * 1000))
    return folder_rates, memory_rates


def jpeg_rates(folder: Path, count: int, batches: int) -> tuple[float, float]:
    """At 128x128 from JPEG files: the loader's images/s alone, and the default model's training images/s."""
    import torch
    from PIL import Image

    from vqtool.model.config import ModelConfig
    from vqtool.model.vqvae import VQVAE, images_to_input
    from vqtool.train.data.memory import Share
    from vqtool.train.data.streaming import default_workers, load_training_set

    if not (folder / "done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for index, pixels in enumerate(_photo_crops(count, 144, 176, seed=3)):
            Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)
        (folder / "done").touch()
    data = load_training_set(folder, 128, log=lambda _: None)
    stream = data.stream(0, 32, 0, Share(workers=default_workers()))
    next(stream)
    began = time.perf_counter()
    for _ in range(batches):
        next(stream)
    loader = batches * 32 / (time.perf_counter() - began)
    model = VQVAE(ModelConfig(image_size=128))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = images_to_input(torch.from_numpy(data.batch(0, 32, seed=0)))
    began = time.perf_counter()
    for _ in range(5):
        result = model(x)
        optimizer.zero_grad()
        (result.recon_loss + result.codebook_loss + 0.25 * result.commit_loss).backward()
        optimizer.step()
    return loader, 5 * 32 / (time.perf_counter() - began)


def main() -> None:
    from vqtool.train.data.streaming import default_workers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "streaming")
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="training steps per timed round")
    parser.add_argument("--workers", type=int, default=None, help="reader processes (default: train's default)")
    parser.add_argument("--only", choices=("speed", "memory"), default=None, help="run one part")
    args = parser.parse_args()
    work = args.work
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores")
    sources = {}
    for label, count in (("small", args.small), ("large", args.large)):
        started = time.perf_counter()
        sources[label] = {
            "PNG folder": make_png_folder(work / f"png-{count}", count),
            "tar shards": make_shards(work / f"tar-{count}", count),
            ".npy": make_npy(work / f"images-{count}.npy", count),
        }
        print(f"{count:,} images ready in {time.perf_counter() - started:.0f} s", flush=True)

    if args.only in (None, "speed"):
        seconds = start_up_seconds(sources["large"]["PNG folder"])
        print(f"\nstart-up, {args.large:,}-file folder: {seconds:.2f} s to the first batch")
        workers = default_workers() if args.workers is None else args.workers
        folder_rates, memory_rates = training_rates(sources["small"]["PNG folder"], args.rounds, args.steps, workers)
        ratios = np.divide(folder_rates, memory_rates)
        print(
            f"\nspeed, default model, batch {BATCH}, {args.small:,} PNGs, {workers} reader processes: folder "
            f"{np.median(folder_rates):.1f} steps/s, in memory {np.median(memory_rates):.1f} steps/s: "
            f"{np.median(ratios):.0%} (rounds: " + ", ".join(f"{r:.0%}" for r in ratios) + ")",
            flush=True,
        )
        loader, step = jpeg_rates(work / "jpeg-128", 2000, 40)
        print(f"128x128 from JPEGs: the loader alone {loader:,.0f} images/s; the training step {step:,.0f} images/s")

    if args.only in (None, "memory"):
        print("\n| source | peak RSS, small | peak RSS, large | difference | file names (large - small) |")
        print("|---|---|---|---|---|")
        names = names_mib(sources["large"]["PNG folder"]) - names_mib(sources["small"]["PNG folder"])
        for kind in sources["small"]:
            small = peak_rss_mib(sources["small"][kind], work / "runs" / f"{kind}-small".replace(" ", "-"))
            large = peak_rss_mib(sources["large"][kind], work / "runs" / f"{kind}-large".replace(" ", "-"))
            listed = f"{names:.0f} MiB" if kind == "PNG folder" else "-"
            print(f"| {kind} | {small:.0f} MiB | {large:.0f} MiB | {large - small:+.0f} MiB | {listed} |", flush=True)


if __name__ == "__main__":
    main()
