"""The presets on the embedded data: quality, codes in use, training time, a figure, and (--bench) speed.

    python -m benchmarks.presets [--steps 1500] [--presets article,f8,f4] [--work DIR] [--figure PNG] [--bench]

Trains `vqtool train --preset NAME` for each preset (1,500 steps, batch 128, seed 0: the issue's
protocol) and prints a table. Finished runs are read back, not retrained. The goals: f8 >= 25.0 dB and
f4 >= 27.0 dB validation PSNR, each with >= 95% of its codes in use on the validation set.

`--figure` draws the same validation images reconstructed by each preset, under the inputs.
`--bench` exports each preset (FP32 and INT8) and runs `vqtool bench` at batch 32 and 256; the goals:
ONNX Runtime FP32 at least as fast as PyTorch eager for encode and decode, INT8 encode >= 2x eager.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS = {"f8": 25.0, "f4": 27.0}
MIN_USAGE = 0.95
FIGURE_IMAGES = 12
BENCH_BATCHES = ("32", "256")


def _vqtool(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vqtool", *args], cwd=REPO, check=check, capture_output=True, text=True
    )


def train(name: str, run: Path, steps: int) -> None:
    if (run / "metrics.jsonl").exists():
        return
    started = time.perf_counter()
    _vqtool("train", "--preset", name, "--steps", str(steps), "--out", str(run))
    print(f"{name}: trained in {time.perf_counter() - started:.0f} s", flush=True)


def quality_table(rows: list[tuple[str, dict]], steps: int) -> None:
    print(f"\n{steps} steps, batch 128, seed 0, embedded data (448 validation images)")
    print("| preset | val PSNR (dB) | codes used | usage | training time | goal |")
    print("|---|---|---|---|---|---|")
    for name, final in rows:
        goal = GOALS.get(name)
        target = ""
        if goal is not None:
            met = final["val_psnr"] >= goal and final["usage"] >= MIN_USAGE
            target = f">= {goal} dB, >= 95% used: {'met' if met else 'NOT met'}"
        print(
            f"| {name} | {final['val_psnr']:.2f} | {int(final['codes_used'])} | {final['usage']:.1%} | "
            f"{final.get('elapsed_s', 0):.0f} s | {target} |"
        )


def draw_figure(runs: dict[str, Path], figure: Path) -> None:
    """Inputs on top, then one row per preset, the same validation images in each."""
    import torch

    from vqtool.model.checkpoint import load_checkpoint
    from vqtool.model.vqvae import images_to_input, output_to_images
    from vqtool.train.data.memory import default_training_set
    from vqtool.train.figures import save_image_rows

    inputs = default_training_set(32).val[:: 448 // FIGURE_IMAGES][:FIGURE_IMAGES]
    rows, labels = [inputs], ["input"]
    for name, run in runs.items():
        model = load_checkpoint(run / "checkpoint.pt").model.eval()
        with torch.no_grad():
            rows.append(output_to_images(model(images_to_input(torch.from_numpy(inputs))).reconstruction).numpy())
        labels.append(name)
    figure.parent.mkdir(parents=True, exist_ok=True)
    save_image_rows(figure, rows, labels, scale=3, label_width=40)
    print(f"figure: {figure}")


def bench(name: str, run: Path) -> list[dict]:
    export = run / "export"
    if not (export / "manifest.json").exists():
        exported = _vqtool("export", str(run / "checkpoint.pt"), "--out", str(export), "--int8", check=False)
        if exported.returncode != 0:  # INT8 failed its parity: time the FP32 graphs, and say why INT8 is missing
            print(f"{name}: {exported.stderr.strip().splitlines()[-1]}")
            _vqtool("export", str(run / "checkpoint.pt"), "--out", str(export))
    report = run / "bench.json"
    batches = [arg for size in BENCH_BATCHES for arg in ("--batch", size)]
    _vqtool("bench", str(export), *batches, "--backend", "onnxruntime", "--out", str(report))
    return [{"preset": name, **row} for row in json.loads(report.read_text())["model_only"]]


def speed_table(rows: list[dict]) -> None:
    print("\n| preset | stage | batch | eager images/s | ORT FP32 × eager | ORT INT8 × eager | goal |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(r["preset"], r["stage"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1] != "encode", k[2]))
    for preset, stage, batch in keys:
        group = {
            (r["backend"], r["precision"]): r
            for r in rows
            if (r["preset"], r["stage"], r["batch"]) == (preset, stage, batch)
        }
        eager, fp32, int8 = (
            group.get(("torch", "fp32")),
            group.get(("onnxruntime", "fp32")),
            group.get(("onnxruntime", "int8")),
        )
        fp32_ratio = fp32["vs_baseline"] if fp32 else 0.0
        int8_ratio = int8["vs_baseline"] if int8 else None
        met = fp32_ratio >= 1.0 and (stage != "encode" or (int8_ratio or 0.0) >= 2.0)
        int8_cell = "-" if int8_ratio is None else f"{int8_ratio:.2f}×"
        print(
            f"| {preset} | {stage} | {batch} | {eager['images_per_s'] if eager else 0:,.0f} | {fp32_ratio:.2f}× | "
            f"{int8_cell} | {'met' if met else 'NOT met'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--presets", default="article,f8,f4")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "presets")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "figures" / "presets.png")
    parser.add_argument("--bench", action="store_true", help="also export each preset and time it (vqtool bench)")
    args = parser.parse_args()
    runs = {name: args.work / name for name in args.presets.split(",")}
    for name, run in runs.items():
        train(name, run, args.steps)
    rows = [(name, json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])) for name, run in runs.items()]
    quality_table(rows, args.steps)
    draw_figure(runs, args.figure)
    if args.bench:
        speed_table([row for name, run in runs.items() for row in bench(name, run)])


if __name__ == "__main__":
    main()
