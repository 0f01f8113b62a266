"""Reproduce vqtool's published speed and memory figures on this machine.

    python -m benchmarks.run [--export EXPORT_DIR] [--images 10000] [--memory 10000,100000] [--work DIR]

Without --export it trains the default model for 300 steps and exports it first. It then writes
real PNG files (32x32 crops of the embedded photographs), and prints:
  1. `vqtool bench` with --images: model-only throughput per backend vs PyTorch eager, and the
     folder encode against the naive script (Pillow loop + batched eager) on the same files;
  2. decode to PNG files against the decoder alone;
  3. peak RSS of `vqtool encode` on each folder size in --memory, each in its own process.
Figures go to WORK/benchmarks.json as well.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vqtool.formats.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]


def vqtool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "vqtool", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"vqtool {' '.join(args)} failed:\n{result.stderr}")
    return result


def png_folder(root: Path, count: int) -> Path:
    """`count` PNG files of 32x32 crops, 1,000 per subfolder; reused if already there."""
    from vqtool.train.data.memory import default_training_set

    folder = root / f"png{count}"
    if len(list(folder.rglob("*.png"))) == count:
        return folder
    data = default_training_set(32)
    for start in range(0, count, 1000):
        crops = data.batch(start // 1000, min(1000, count - start), seed=11)
        sub = folder / f"{start // 1000:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        for offset, crop in enumerate(crops):
            Image.fromarray(crop).save(sub / f"{start + offset:07d}.png", compress_level=1)
    return folder


def peak_rss_mib(*args: str) -> tuple[float, float]:
    """(peak resident MiB, seconds) of one `vqtool` process, from GNU time."""
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "vqtool", *args], cwd=REPO, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(result.stderr)
    kib = int(re.findall(r"^(\d+)$", result.stderr, re.MULTILINE)[-1])
    return kib / 1024, time.perf_counter() - started


def _decoder_images_per_s(export: Path, manifest: Manifest, grids: np.ndarray) -> float:
    """The decoder alone, without spinning threads as in the pipeline; its session is closed on return."""
    from vqtool.bench.timing import time_calls
    from vqtool.runtime.select import open_runner

    decoder = open_runner(export, manifest, "decoder").runner
    return time_calls(lambda: decoder(grids), len(grids), min_seconds=2.0).images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, help="export folder (default: train + export one)")
    parser.add_argument("--images", type=int, default=10_000, help="files for the end-to-end comparison")
    parser.add_argument("--memory", default="10000,100000", help="folder sizes for the peak-RSS figures")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work", help="scratch folder")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, object] = {}

    export = args.export
    if export is None:
        export = args.work / "export"
        manifest_file = export / "manifest.json"
        if not manifest_file.exists() or "encoder.int8" not in manifest_file.read_text():
            if not (args.work / "run" / "checkpoint.pt").exists():
                print("training the default model for 300 steps ...", flush=True)
                vqtool("train", "--steps", "300", "--out", str(args.work / "run"))
            print("exporting it (FP32, FP16, INT8) ...", flush=True)
            checkpoint = str(args.work / "run" / "checkpoint.pt")
            vqtool("export", checkpoint, "--out", str(export), "--fp16", "--int8", "--overwrite")

    folder = png_folder(args.work, args.images)
    print(f"\n== vqtool bench on {args.images} PNG files ==", flush=True)
    bench = vqtool("bench", str(export), "--images", str(folder), "--out", str(args.work / "bench.json"))
    print(bench.stdout)
    roofline = [line for line in bench.stderr.splitlines() if line.startswith("FP32 ceiling")]
    print("\n".join(roofline) + "\n")
    figures["bench"] = json.loads((args.work / "bench.json").read_text())

    print("== decode to PNG files vs the decoder alone ==", flush=True)
    codes = args.work / "codes.npy"
    vqtool("encode", str(folder), "--model", str(export), "--out", str(codes), "--batch-size", "256", "--overwrite")
    from vqtool.formats.manifest import read_manifest
    from vqtool.host import writer_count
    from vqtool.pipeline.decode import decode_file
    from vqtool.runtime.select import open_runner

    manifest = read_manifest(export)
    writers = writer_count()
    grids = np.load(codes)[:256].astype(np.int32)
    model_only = _decoder_images_per_s(export, manifest, grids)
    decoder = open_runner(export, manifest, "decoder").runner
    decode_figures: dict[str, float] = {"writers": writers, "model_only_images_per_s": model_only}
    print(f"decoder alone: {model_only:,.0f} images/s")
    # Into a new folder, and the disk synced first: deleting thousands of files just before makes the
    # next thousands slow to create on this machine's ext4 (discard), whoever creates them.
    targets = {"disk": args.work}
    if Path("/dev/shm").is_dir():
        targets["RAM (/dev/shm)"] = Path("/dev/shm")
    for where, root in targets.items():
        os.sync()
        out = Path(tempfile.mkdtemp(prefix="vqtool-decoded-", dir=root))
        try:
            result = decode_file(codes, manifest, decoder, out, batch_size=256, workers=writers, log=lambda _: None)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        to_png = result.count / result.seconds
        decode_figures[f"to_png_{where.split()[0].lower()}_images_per_s"] = to_png
        print(
            f"decode to PNG files on {where}: {to_png:,.0f} images/s with {writers} writer process(es), "
            f"{to_png / model_only:.0%} of the decoder alone"
        )
    figures["decode"] = decode_figures
    print()

    print("== peak memory of vqtool encode ==", flush=True)
    figures["memory"] = []
    for count in (int(c) for c in args.memory.split(",") if c):
        images = png_folder(args.work, count)
        rss, seconds = peak_rss_mib(
            "encode",
            str(images),
            "--model",
            str(export),
            "--out",
            str(args.work / f"codes{count}.npy"),
            "--batch-size",
            "256",
            "--overwrite",
        )
        figures["memory"].append({"images": count, "peak_rss_mib": rss, "seconds": seconds})  # type: ignore[union-attr]
        print(f"{count:>7} images: peak RSS {rss:,.0f} MiB, {seconds:.1f} s ({count / seconds:,.0f} images/s)")
    (args.work / "benchmarks.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nfigures written to {args.work / 'benchmarks.json'}")


if __name__ == "__main__":
    main()
